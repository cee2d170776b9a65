"""On CUDA: every registered method gives the CPU's result (Dice within 0.005), SITReg's,
KeyMorph's and AVSM's grouped pairs give the one-pair results, batch mode runs under torchrun
with NCCL, and register writes its HTML report from a CUDA result; skipped without a GPU."""

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


@pytest.mark.parametrize("name", ["sitreg", "keymorph", "avsm"])
def test_register_many_on_cuda_matches_one_pair_at_a_time(name: str) -> None:
    fixed, moving, fl, ml = demo_brains()
    method = create(name, device="cuda")
    pairs = [(fixed, moving), (moving, fixed), (fixed, moving)]
    many = method.register_many(pairs)
    for (f, m), res in zip(pairs, many, strict=True):
        one = method.register(f, m)
        a = one.transform.displacement(f.geometry)
        b = res.transform.displacement(f.geometry)
        assert float((a.cpu() - b.cpu()).abs().max()) < 0.01  # mm


def test_batch_under_torchrun_with_nccl(tmp_path) -> None:
    # one process per GPU (here: as many as there are, at most 2), pairs shared out over NCCL
    import csv
    import os
    import subprocess
    import sys
    from importlib.resources import files

    gpus = min(2, torch.cuda.device_count())
    demo = files("unireg.demo_data")
    a, b = demo / "IXI012-HH-1211-T1_ds.nii.gz", demo / "IXI013-HH-1212-T1_ds.nii.gz"
    with open(tmp_path / "pairs.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["fixed", "moving"])
        w.writerows([[a, b], [b, a], [a, a], [b, b]])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={gpus}", "-m", "unireg", "batch", str(tmp_path / "pairs.csv"),
           "-o", str(tmp_path / "out"), "--method", "sitreg", "--device", "cuda",
           "--batch-size", "2", "--quiet"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    with open(tmp_path / "out" / "summary.csv", newline="") as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == ["done"] * 4


def test_register_on_cuda_writes_the_html_report(tmp_path) -> None:
    import json
    from importlib.resources import files

    from unireg.cli import main

    demo = files("unireg.demo_data")
    f, m = demo / "IXI012-HH-1211-T1_ds.nii.gz", demo / "IXI013-HH-1212-T1_ds.nii.gz"
    fl, ml = (
        demo / "IXI012-HH-1211-T1_ds_DLMUSE.nii.gz",
        demo / "IXI013-HH-1212-T1_ds_DLMUSE.nii.gz",
    )
    out = tmp_path / "out"
    assert main(["register", str(f), str(m), "-o", str(out), "--method", "sitreg", "--device",
                 "cuda", "--fixed-labels", str(fl), "--moving-labels", str(ml), "--report",
                 "html", "-q"]) == 0  # fmt: skip
    assert "report.html" in json.loads((out / "manifest.json").read_text())["files"]
