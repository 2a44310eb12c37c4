import logging

import pytest
import torch

from tpdiff_plugin.utils.errors import UserError
from tpdiff_plugin.utils.precision import half_dtype, logger

CPU, CUDA = torch.device('cpu'), torch.device('cuda', 0)


def test_half_means_bf16_and_fp16_is_on_request():
    assert half_dtype(False, CPU) is None and half_dtype(None, CUDA) is None
    assert half_dtype(True, CPU) is torch.bfloat16 and half_dtype('bf16', CPU) is torch.bfloat16
    assert half_dtype('fp16', CPU) is torch.float16


def test_a_gpu_without_bf16_falls_back_to_fp16_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(logger, 'propagate', True)  # basicsr's logger does not propagate to caplog once set up
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: True)
    assert half_dtype(True, CUDA) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: False)
    with caplog.at_level(logging.INFO, logger='basicsr'):
        assert half_dtype(True, CUDA) is torch.float16
    assert 'no bf16' in caplog.text
    assert half_dtype('fp16', CUDA) is torch.float16


@pytest.mark.parametrize('bad', ['fp8', 'half', 1, 16])
def test_bad_values_name_the_option(bad):
    with pytest.raises(UserError, match='half: expected true, false, bf16 or fp16'):
        half_dtype(bad, CPU)
