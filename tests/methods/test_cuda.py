"""Every registered method on CUDA gives the CPU's result (Dice within 0.005); skipped without
a GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import demo_brains

from unireg.methods import create, entries
from unireg.metrics import registration_metrics

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"),
]


@pytest.mark.parametrize("name", list(entries()))
def test_every_method_on_cuda_matches_the_cpu(name: str) -> None:
    fixed, moving, fl, ml = demo_brains()
    dice = {}
    for device in ("cpu", "cuda"):
        result = create(name, device=device).register(fixed, moving, seed=0)
        metrics = registration_metrics(result, fixed_labels=fl, moving_labels=ml, hd95=False)
        dice[device] = metrics["dice_mean"]
    assert abs(dice["cuda"] - dice["cpu"]) < 0.005, dice
