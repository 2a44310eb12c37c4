"""PSNR / SSIM of a restored image under a deblurring benchmark's protocol (``tpdiff compare``).

- ``gopro``: basicsr's ``calculate_psnr`` / ``calculate_ssim`` on 8-bit RGB, ``crop_border`` 0 by default,
  the protocol of the GoPro and HIDE benchmarks;
- ``realblur``: RealBlur's alignment-aware evaluation. RealBlur's ground truth is not pixel-aligned with
  the blurry photo, so before measuring, the output is scaled by the least-squares gain that matches it
  to the GT's intensities, aligned to the GT with OpenCV's ECC (``cv2.findTransformECC`` on gray images,
  100 iterations; ``homography`` motion as in RealBlur's published evaluation script, or ``translation``)
  and warped; pixels the warp brings in from outside the image are masked out of both images. PSNR is
  then the masked mean squared error over the valid pixels and SSIM is skimage's Gaussian-window SSIM
  map averaged over the valid pixels (excluding a 5-pixel border, the window's radius), per channel,
  then over channels.
"""
import cv2
import numpy as np
from basicsr.metrics import calculate_psnr, calculate_ssim
from basicsr.utils import tensor2img
from skimage.metrics import structural_similarity

from tpdiff_plugin.utils.errors import UserError

PROTOCOLS = ('gopro', 'realblur')
ALIGN_MOTIONS = ('homography', 'translation')


def realblur_align(output, gt, motion='homography', iterations=100):
    """RealBlur-style alignment of ``output`` to ``gt`` (float HxWx3 RGB in [0, 1]).

    Returns ``(output_aligned, gt_masked, mask)``; ``mask`` (HxWx3, 0/1) marks the pixels the warp keeps.
    Written here because no library ships this evaluation step: an intensity-matching gain, an ECC fit of
    ``motion`` ('homography' or 'translation'), a warp of the output into the GT's frame and a mask of the
    pixels that came from inside the output.
    """
    output = output.astype(np.float32)
    gt = gt.astype(np.float32)
    gain = float((gt * output).sum() / max(float((output * output).sum()), 1e-12))
    scaled = output * gain
    h, w = gt.shape[:2]
    if motion == 'homography':
        mode, warp = cv2.MOTION_HOMOGRAPHY, np.eye(3, dtype=np.float32)
    elif motion == 'translation':
        mode, warp = cv2.MOTION_TRANSLATION, np.eye(2, 3, dtype=np.float32)
    else:
        raise UserError(f'metrics.align_motion: expected "homography" or "translation", got {motion!r}')
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, iterations, 0)
    try:
        _, warp = cv2.findTransformECC(cv2.cvtColor(gt, cv2.COLOR_RGB2GRAY), cv2.cvtColor(scaled, cv2.COLOR_RGB2GRAY),
                                       warp, mode, criteria, None, 5)
    except cv2.error:  # ECC did not converge (e.g. a flat image): measure unaligned
        warp = np.eye(3, dtype=np.float32) if mode == cv2.MOTION_HOMOGRAPHY else np.eye(2, 3, dtype=np.float32)
    flags = cv2.WARP_INVERSE_MAP
    if mode == cv2.MOTION_HOMOGRAPHY:
        aligned = cv2.warpPerspective(scaled, warp, (w, h), flags=cv2.INTER_CUBIC + flags,
                                      borderMode=cv2.BORDER_REFLECT)
        mask = cv2.warpPerspective(np.ones_like(scaled), warp, (w, h), flags=cv2.INTER_NEAREST + flags,
                                   borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    else:
        aligned = cv2.warpAffine(scaled, warp, (w, h), flags=cv2.INTER_CUBIC + flags, borderMode=cv2.BORDER_REFLECT)
        mask = cv2.warpAffine(np.ones_like(scaled), warp, (w, h), flags=cv2.INTER_NEAREST + flags,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return aligned * mask, gt * mask, mask


def realblur_metrics(output, gt, motion='homography'):
    """``(psnr, ssim)`` of RealBlur's alignment-aware protocol for float HxWx3 RGB images in [0, 1]."""
    out_m, gt_m, mask = realblur_align(output, gt, motion)
    err = float(((gt_m - out_m) ** 2).sum(dtype=np.float64) / max(float(mask.sum()), 1.0))
    psnr = float('inf') if err == 0 else 10 * np.log10(1.0 / err)
    _, smap = structural_similarity(gt_m, out_m, channel_axis=2, gaussian_weights=True, use_sample_covariance=False,
                                    data_range=1.0, full=True)
    pad = int(3.5 * 1.5 + 0.5)  # radius of skimage's Gaussian window (sigma 1.5, truncated at 3.5 sigma)
    smap, m = (smap * mask)[pad:-pad, pad:-pad], mask[pad:-pad, pad:-pad]
    ssim = float(np.mean(smap.sum(axis=(0, 1)) / np.maximum(m.sum(axis=(0, 1)), 1.0)))
    return float(psnr), ssim


def psnr_ssim(output, gt, protocol='gopro', crop_border=0, align_motion='homography'):
    """PSNR / SSIM of two ``[1, 3, H, W]`` tensors in [0, 1] under ``protocol`` (8-bit RGB)."""
    out8 = tensor2img(output, rgb2bgr=False)  # uint8 HxWx3 RGB, clipped and rounded
    gt8 = tensor2img(gt, rgb2bgr=False)
    if protocol == 'gopro':
        return (float(calculate_psnr(out8, gt8, crop_border, test_y_channel=False)),
                float(calculate_ssim(out8, gt8, crop_border, test_y_channel=False)))
    return realblur_metrics(out8.astype(np.float32) / 255, gt8.astype(np.float32) / 255, align_motion)
