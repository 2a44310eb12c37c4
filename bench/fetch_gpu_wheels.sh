#!/usr/bin/env bash
# Run HERE (a CPU machine with PyPI) before a GPU check: the lent GPU machine has Python 3.12 with
# torch/torchvision/scikit-image/opencv but cannot fetch, so the rest travels as wheels in .whl/
# (about 42 MB with onnx and onnxruntime for the export tests; name `.whl` in the device tool's `carry`, limit 64 MiB). See bench/README.md, "GPU check".
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
# basicsr ships only an sdist whose setup.py imports torch: build a pure-Python wheel with our venv.
.venv/bin/pip wheel -q --no-deps --no-build-isolation basicsr==1.4.2 -w .whl
# the plugin itself, for its console scripts: `pip install -e .` there wants setuptools from the network
.venv/bin/pip wheel -q --no-deps --no-build-isolation . -w .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  lmdb==1.7.5 PyWavelets==1.9.0 mmengine-lite==0.10.7 addict==2.4.0 yapf==0.43.0 termcolor==3.3.0 \
  spandrel==0.4.2 spandrel-extra-arches==0.2.0 \
  onnx==1.23.2 ml-dtypes==0.6.0 onnxruntime==1.32.0 flatbuffers==25.12.19 protobuf==7.36.2
ls -la .whl
