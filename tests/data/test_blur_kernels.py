"""Camera-shake kernels: valid PSFs of the requested size, seeded, with a real extent and no shift."""
import numpy as np
import pytest

from tpdiff_plugin.data.blur_kernels import random_shake_kernel, rasterise, shake_trajectory

SIZES = list(range(7, 26, 2)) + [8, 24]


def centroid(k):
    ys, xs = np.mgrid[:k.shape[0], :k.shape[1]]
    return (k * ys).sum(), (k * xs).sum()


@pytest.mark.parametrize('size', SIZES)
def test_kernel_is_a_valid_psf_of_the_requested_size(size):
    for seed in range(5):
        k = random_shake_kernel(size, seed)
        assert k.shape == (size, size)
        assert k.min() >= 0
        assert k.sum() == pytest.approx(1.0, abs=1e-12)
        # centre of mass at the centre pixel: blurring does not shift the image
        cy, cx = centroid(k)
        assert cy == pytest.approx((size - 1) / 2, abs=1e-9) and cx == pytest.approx((size - 1) / 2, abs=1e-9)


@pytest.mark.parametrize('size', [7, 15, 25])
def test_kernel_is_not_a_delta(size):
    for seed in range(10):
        k = random_shake_kernel(size, seed)
        assert k.max() < 0.5
        ys, xs = np.nonzero(k > 1e-3 * k.max())
        extent = max(ys.max() - ys.min(), xs.max() - xs.min())
        assert extent >= 0.35 * (size - 1)  # the path reaches at least 70 % of the half-width from the centre
        assert (k > 0).sum() >= size  # mass spread over many pixels, not a few


def test_same_seed_same_kernel_different_seed_different_kernel():
    assert np.array_equal(random_shake_kernel(17, 3), random_shake_kernel(17, 3))
    assert np.array_equal(random_shake_kernel(17, np.random.default_rng(3)), random_shake_kernel(17, 3))
    kernels = [random_shake_kernel(17, s) for s in range(8)]
    for i in range(len(kernels)):
        for j in range(i + 1, len(kernels)):
            assert np.abs(kernels[i] - kernels[j]).sum() > 0.1


def test_trajectory_moves_at_constant_speed_and_is_straight_without_randomness():
    path = shake_trajectory(0, n_samples=200)
    assert path.shape == (200,)
    np.testing.assert_allclose(np.abs(np.diff(path)), 1.0, atol=1e-9)
    straight = shake_trajectory(1, n_samples=50, jitter=0.0, pull=0.0, jump_prob=0.0)
    direction = (straight[1] - straight[0])
    np.testing.assert_allclose(straight, np.arange(50) * direction, atol=1e-9)


def test_rasterise_a_horizontal_line_fills_the_centre_row_evenly():
    size = 11
    points = np.linspace(-1, 1, 2001) + 0j  # a horizontal segment, densely sampled
    k = rasterise(points, size, fill=1.0)
    assert k.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(k[np.arange(size) != 5], 0.0)  # only the centre row
    row = k[5]
    # sub-pixel accumulation of a uniform segment spanning columns 0..10: the 9 inner columns get 1/10
    # each, the two end columns half of that
    np.testing.assert_allclose(row[1:-1], 0.1, atol=1e-3)
    np.testing.assert_allclose(row[[0, -1]], 0.05, atol=1e-3)


def test_rasterise_splits_a_point_bilinearly():
    # two points whose centre of mass is the origin, at +-(0.25, 0.5) in a 5x5 kernel with fill 0.25:
    # their distances scale to 0.25 * 2 = 0.5 px along x at most, i.e. (x, y) = (2 +- 0.5, 2 +- 0.25)
    points = np.array([0.5 + 0.25j, -0.5 - 0.25j])
    k = rasterise(points, 5, fill=0.25)
    expected = np.zeros((5, 5))
    # point (2.5, 2.25): x between 2 and 3 half/half, y 3/4 on row 2 and 1/4 on row 3
    for (y, x), w in {(2, 2): 0.375, (2, 3): 0.375, (3, 2): 0.125, (3, 3): 0.125}.items():
        expected[y, x] += w / 2
    # point (1.5, 1.75): x between 1 and 2, y 1/4 on row 1 and 3/4 on row 2
    for (y, x), w in {(1, 1): 0.125, (1, 2): 0.125, (2, 1): 0.375, (2, 2): 0.375}.items():
        expected[y, x] += w / 2
    np.testing.assert_allclose(k, expected, atol=1e-12)


def test_rasterise_rejects_bad_arguments():
    with pytest.raises(ValueError):
        rasterise(np.array([0j, 1 + 0j]), 2)
    with pytest.raises(ValueError):
        rasterise(np.array([0j, 1 + 0j]), 7, fill=1.5)
