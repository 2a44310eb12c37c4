"""The periodic-artifact measure: zero for the input itself, large for checkerboards and grids, near zero for
legitimate sharpening and for noise."""
import cv2
import numpy as np
import pytest
import torch

from tpdiff_plugin.utils.artifacts import periodic_artifact_db, periodic_peak_db


@pytest.fixture(scope='module')
def photo():
    from skimage import data
    return np.ascontiguousarray(data.astronaut()[100:228, 150:278])  # 128x128 RGB with texture


def test_identity_scores_zero(photo):
    assert periodic_artifact_db(photo, photo) == 0.0


@pytest.mark.parametrize('period', [2, 4])
def test_checkerboards_and_grids_of_a_few_grey_levels_stand_out(photo, period):
    yy, xx = np.mgrid[:128, :128]
    checker = (((yy // (period // 2)) + (xx // (period // 2))) % 2 * 2 - 1)[:, :, None]
    stripes = (((yy // (period // 2)) % 2) * 2 - 1)[:, :, None]
    for pattern in (checker, stripes):
        out = np.clip(photo.astype(np.float64) + 3 * pattern, 0, 255)  # +-3 grey levels: faint
        assert periodic_artifact_db(out, photo) > 5
    strong = np.clip(photo.astype(np.float64) + 4 * checker, 0, 255)
    assert periodic_artifact_db(strong, photo) > periodic_artifact_db(photo + 1.0 * checker, photo) > 5


def test_sharpening_blurring_and_noise_are_not_artifacts(photo):
    f = photo.astype(np.float64)
    sharpened = np.clip(2 * f - cv2.GaussianBlur(f, (0, 0), 2), 0, 255)
    blurred = cv2.GaussianBlur(f, (0, 0), 1.5)
    noisy = np.clip(f + np.random.default_rng(0).normal(0, 3, f.shape), 0, 255)
    for img in (sharpened, blurred, noisy):
        assert abs(periodic_artifact_db(img, photo)) < 3


def test_accepts_tensors_and_rejects_tiny_images(photo):
    t = torch.from_numpy(photo).permute(2, 0, 1).float() / 255
    assert periodic_peak_db(t[None]) == pytest.approx(periodic_peak_db(photo.astype(np.float64) / 255), abs=1e-6)
    with pytest.raises(ValueError, match='16x16'):
        periodic_peak_db(np.zeros((8, 40)))
