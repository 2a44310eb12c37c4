"""tpdiff-plugin: TP-Diff unpaired blind motion deblurring as a BasicSR plugin."""
import re

from setuptools import find_packages, setup

with open('README.md', encoding='utf-8') as f:
    long_description = f.read()
with open('tpdiff_plugin/version.py', encoding='utf-8') as f:  # not imported: the package imports torch
    version = re.search(r"__version__ = '([^']+)'", f.read()).group(1)

setup(
    name='tpdiff_plugin',
    version=version,
    description='TP-Diff: unpaired blind motion deblurring with a diffusion texture prior, for BasicSR',
    long_description=long_description,
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.9',
    packages=find_packages(include=['tpdiff_plugin', 'tpdiff_plugin.*']),
    # The options files ship inside the package (`tpdiff options list|copy`, packaged names for -opt); the
    # repository's top-level `options/` is a link to this folder, so the documented paths work in a clone too.
    package_data={'tpdiff_plugin': ['options/*.yml', 'options/*/*.yml', 'options/README.md']},
    include_package_data=False,
    # Ranges, not pins: the plugin must not fight the user's environment. The tested pins live in
    # requirements.txt. basicsr is listed without its own setup_requires problem in mind: install it
    # with `pip install --no-build-isolation basicsr==1.4.2` first (see README). mmengine is optional
    # (either `mmengine` or `mmengine-lite` provides it), so it is an extra, not a requirement.
    install_requires=[
        'torch>=2.1',
        'torchvision>=0.16',
        'basicsr>=1.4.2',
        'numpy',
        # basicsr requires opencv-python (the GUI build): requiring the headless build as well would install two
        # distributions of the same `cv2` folder, which overwrite each other. So we take basicsr's.
        'opencv-python',
        'lmdb',
        'PyYAML',
        'PyWavelets>=1.4',
        'scikit-image>=0.22',
        'tqdm',
    ],
    extras_require={
        'mmengine': ['mmengine-lite>=0.10'],
        'peers': ['spandrel>=0.4', 'spandrel-extra-arches>=0.2'],
        'test': ['pytest'],
    },
    entry_points={
        'console_scripts': [
            'basicsr=tpdiff_plugin.cli:basicsr_main',
            'tpdiff=tpdiff_plugin.cli:tpdiff_main',
        ],
    },
)
