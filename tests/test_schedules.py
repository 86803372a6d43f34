"""lossless_trainer.schedules: the WarmupCosine learning-rate schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lossless_trainer.schedules import WarmupCosine


def test_warmup_cosine_shape():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    schedule = WarmupCosine(opt, warmup_steps=3, total_steps=13, min_lr_ratio=0.1)
    lrs = []
    for _ in range(15):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert lrs[8] == pytest.approx(0.2 + 1.8 * 0.5)  # half way down the cosine
    assert lrs[13:] == pytest.approx([0.2, 0.2])
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        WarmupCosine(opt, 5, 5)
