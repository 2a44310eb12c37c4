"""Random camera-shake blur kernels for the demo set (after Boracchi & Foi, IEEE TIP 2012).

A hand-held camera's shake is modelled as the path of a point during the exposure: a 2-D random walk
that keeps its direction (inertia), drifts randomly, is pulled back towards where it started (the hand
corrects itself) and now and then jerks (an impulsive jump that turns the motion around). Sampled at a
constant speed, the path spends equal time on equal lengths, so rasterising its samples with sub-pixel
(bilinear) accumulation and normalising to sum 1 gives the blur kernel.

No installed library generates such kernels (scikit-image, OpenCV and basicsr offer only Gaussian or
straight-line kernels), hence this small module. Shapes: a kernel is a ``(size, size)`` float64 array,
non-negative, summing to 1, with its centre of mass exactly at the centre pixel so that blurring does
not shift the image.
"""
import numpy as np


def _as_rng(rng):
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def shake_trajectory(rng, n_samples=256, jitter=None, pull=None, jump_prob=None):
    """Sample a camera-shake path as ``n_samples`` complex positions (x + iy) at constant speed.

    Args:
        rng (np.random.Generator | int): random source or seed.
        n_samples (int): samples along the path (its length in steps of 1).
        jitter (float | None): random turning per step, in units of the step; drawn if None.
        pull (float | None): strength of the pull back towards the start; drawn if None.
        jump_prob (float | None): per-step probability of an impulsive jerk; drawn if None.

    Returns:
        ndarray: complex128, shape ``(n_samples,)``; the scale is arbitrary (see :func:`rasterise`).
    """
    rng = _as_rng(rng)
    jitter = rng.uniform(0.01, 0.12) if jitter is None else jitter
    pull = rng.uniform(0.0, 0.001) if pull is None else pull
    jump_prob = rng.uniform(0.0, 4.0 / n_samples) if jump_prob is None else jump_prob
    noise = rng.standard_normal((n_samples, 2)) @ np.array([1.0, 1j])
    jumps = rng.random(n_samples) < jump_prob
    turn = np.exp(1j * (np.pi + rng.uniform(-0.5, 0.5, n_samples)))
    angle = rng.uniform(0.0, 2 * np.pi)
    velocity = np.exp(1j * angle)
    pos = np.zeros(n_samples, dtype=np.complex128)
    # A sequential loop: each step depends on the previous position and velocity.
    for t in range(1, n_samples):
        change = jitter * noise[t] - pull * pos[t - 1]
        if jumps[t]:
            change += 2.0 * velocity * turn[t]
        velocity = velocity + change
        velocity /= max(abs(velocity), 1e-12)
        pos[t] = pos[t - 1] + velocity
    return pos


def rasterise(points, size, fill=1.0):
    """Accumulate path samples into a ``size x size`` kernel with bilinear sub-pixel weights.

    The path is scaled so that its farthest sample from its centre of mass (per axis) lies at
    ``fill * (size - 1) / 2`` pixels from the centre, then its centre of mass is placed at the centre
    pixel ``((size - 1) / 2, (size - 1) / 2)``. Bilinear splatting preserves the centre of mass, so the
    kernel's is exactly there too.

    Args:
        points (ndarray): complex positions (x + iy), equally weighted.
        size (int): kernel side in pixels (>= 3).
        fill (float): in (0, 1]; how much of the kernel the path spans.

    Returns:
        ndarray: float64 ``(size, size)``, non-negative, sum 1, rows are y, columns are x.
    """
    if size < 3:
        raise ValueError(f'kernel size must be >= 3, got {size}')
    if not 0 < fill <= 1:
        raise ValueError(f'fill must be in (0, 1], got {fill}')
    x, y = points.real - points.real.mean(), points.imag - points.imag.mean()
    reach = max(np.abs(x).max(), np.abs(y).max())
    half = (size - 1) / 2
    scale = fill * half / reach if reach > 0 else 0.0
    x, y = x * scale + half, y * scale + half
    x0 = np.clip(np.floor(x).astype(int), 0, size - 2)
    y0 = np.clip(np.floor(y).astype(int), 0, size - 2)
    fx, fy = x - x0, y - y0
    kernel = np.zeros((size, size), dtype=np.float64)
    np.add.at(kernel, (y0, x0), (1 - fx) * (1 - fy))
    np.add.at(kernel, (y0, x0 + 1), fx * (1 - fy))
    np.add.at(kernel, (y0 + 1, x0), (1 - fx) * fy)
    np.add.at(kernel, (y0 + 1, x0 + 1), fx * fy)
    return kernel / kernel.sum()


def random_shake_kernel(size, rng):
    """A random camera-shake kernel of ``size x size`` pixels (see the module docstring).

    The path spans 70 to 100 % of the kernel (``fill``), so the blur really has about the size asked
    for: it is never close to a delta.

    Args:
        size (int): kernel side (the demo uses 7 to 25).
        rng (np.random.Generator | int): random source or seed; the same seed gives the same kernel.
    """
    rng = _as_rng(rng)
    fill = rng.uniform(0.7, 1.0)
    path = shake_trajectory(rng, n_samples=256)
    return rasterise(path, size, fill=fill)
