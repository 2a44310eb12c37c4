"""Helpers shared by the model tests (imported as ``model_helpers``; pytest puts this folder on sys.path)."""
import torch
from basicsr.models import build_model


def batch(seed, n=2, size=32):
    """A seeded unpaired training batch: random blurry ``lq`` and sharp ``ref`` images."""
    g = torch.Generator().manual_seed(seed)
    return {'lq': torch.rand(n, 3, size, size, generator=g), 'ref': torch.rand(n, 3, size, size, generator=g)}


def build(opt, seed=0):
    """``build_model(opt)`` with the network initialisation seeded."""
    torch.manual_seed(seed)
    return build_model(opt)
