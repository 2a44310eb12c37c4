"""Periodic-artifact measure: how much a restored image gained in spectral peaks at 2- and 4-pixel periods.

Up- and downsampling by 2 (pixel shuffle, strided convs) and an adversarial game that drifts leave
checkerboards and grids: energy concentrated at exactly the spatial frequencies 1/2 and 1/4 cycle per pixel.
Deblurring legitimately raises the energy of *all* high frequencies, so the measure looks at peaks, not
levels: for each such frequency (fy, fx) in {0, 1/4, 1/2, 3/4}² except (0, 0), the power of that bin of the
windowed spectrum is divided by the median power of the ring of bins around it (Chebyshev distance 3-5),
and the ratios are averaged. ``periodic_peak_db`` is that average in dB for one image;
``periodic_artifact_db(out, ref)`` is out's minus ref's (ref: the blurry input, or the ground truth).
0 dB: no more periodic structure than the reference; a visible checkerboard is typically > +3 dB.

Written by hand: no library offers a checkerboard measure (it is a few lines of numpy FFT). Images are
``[H, W]`` or ``[H, W, C]`` arrays (uint8, uint16 or float, any range; the luminance-like channel mean is
used) or ``[C, H, W]`` / ``[1, C, H, W]`` torch tensors; H and W at least 16.
"""
import numpy as np

_PERIOD_FREQS = (0.0, 0.25, 0.5, 0.75)  # cycles per pixel: periods 4 and 2 (0.75 is the alias of -1/4)
_RING = (3, 5)  # inner / outer Chebyshev radius, in bins, of the background ring around each peak bin


def _gray(img):
    if hasattr(img, 'detach'):  # torch tensor, channels first
        img = img.detach().cpu().float().numpy()
        img = img.reshape(img.shape[-3:]) if img.ndim == 4 else img
        img = img.mean(axis=0) if img.ndim == 3 else img
    img = np.asarray(img, dtype=np.float64)
    if img.ndim == 3:
        img = img.mean(axis=2)
    if img.ndim != 2 or min(img.shape) < 16:
        raise ValueError(f'periodic_peak_db: need an image of at least 16x16, got shape {img.shape}')
    return img


def periodic_peak_db(img):
    """Mean ratio, in dB, of the spectral power at the period-2/4 frequencies to its surroundings."""
    g = _gray(img)
    h, w = g.shape
    window = np.outer(np.hanning(h), np.hanning(w))
    power = np.abs(np.fft.fft2((g - g.mean()) * window)) ** 2
    offsets = [(dy, dx) for dy in range(-_RING[1], _RING[1] + 1) for dx in range(-_RING[1], _RING[1] + 1)
               if max(abs(dy), abs(dx)) >= _RING[0]]
    ratios = []
    for fy in _PERIOD_FREQS:
        for fx in _PERIOD_FREQS:
            if fy == 0 and fx == 0:
                continue
            y, x = int(round(fy * h)) % h, int(round(fx * w)) % w
            ring = [power[(y + dy) % h, (x + dx) % w] for dy, dx in offsets]
            ratios.append(power[y, x] / (np.median(ring) + 1e-20))
    return float(10 * np.log10(np.mean(ratios) + 1e-20))


def periodic_artifact_db(out, ref):
    """``periodic_peak_db(out) - periodic_peak_db(ref)``: > 0 when ``out`` has more periodic structure."""
    return periodic_peak_db(out) - periodic_peak_db(ref)
