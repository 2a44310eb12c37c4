"""Fuzzed image files through every image reader: a result under the colour rule, or one clear error line.

Inputs: small valid PNG/JPEG/TIFF/BMP/WebP/PNM images (gray, BGR, BGRA, gray+alpha, palette; 8 and 16 bit;
opaque or transparent alpha), then truncated, overwritten, header fields set to huge values, bytes inserted
or deleted; and random bytes with or without a real magic number (``fuzz_helpers.mutated_bytes``).
Readers: ``image_checks.decode_bgr8`` / ``read_bgr8`` / ``image_size`` (UserError) and ``tpdiff deblur``'s
``read_image`` (ValueError with a reason).
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_helpers import fuzz_settings, image_bytes, mutated_bytes, outcome
from tpdiff_plugin.data import image_checks
from tpdiff_plugin.tools.deblur import read_image

EXTENSIONS = ['.png', '.jpg', '.tif', '.bmp', '.webp', '.ppm', '.bin']
LIMIT = 4_000_000  # declared-size limit while fuzzing: the same refusal as the default 150 MP, reached sooner

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning')  # Pillow's notes on the damaged files it parses


@pytest.fixture(autouse=True)
def _small_limit(monkeypatch):
    monkeypatch.setattr(image_checks, 'MAX_PIXELS', LIMIT)


@pytest.fixture(scope='module')
def spot(tmp_path_factory):
    return tmp_path_factory.mktemp('fuzz_images')


def check_bgr8(img):
    assert isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.shape[0] >= 1 and img.shape[1] >= 1 and img.flags['C_CONTIGUOUS']


@fuzz_settings()
@given(image_bytes())
def test_valid_images_decode_unless_transparent(data):
    img, error = outcome(image_checks.decode_bgr8, data, 'seed')
    if error is None:
        check_bgr8(img)
    else:
        assert 'transparent' in error


@fuzz_settings(2)
@given(mutated_bytes())
def test_decode_bgr8(data):
    img, _ = outcome(image_checks.decode_bgr8, data, 'fuzz[key]')
    if img is not None:
        check_bgr8(img)


@fuzz_settings(2)
@given(mutated_bytes(), st.sampled_from(EXTENSIONS))
def test_file_readers(spot, data, ext):
    path = spot / f'image{ext}'
    path.write_bytes(data)
    img, _ = outcome(image_checks.read_bgr8, str(path))
    if img is not None:
        check_bgr8(img)
    size, _ = outcome(image_checks.image_size, str(path))
    if size is not None:
        assert len(size) == 2 and all(isinstance(v, int) and v >= 1 for v in size)
    img, _ = outcome(read_image, str(path), max_pixels=LIMIT, errors=(ValueError,))
    if img is not None:
        assert img.dtype in (np.uint8, np.uint16) and img.size > 0
        assert img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (1, 3, 4))
