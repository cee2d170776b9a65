"""``unireg batch``: every pair of a CSV in one process, resumable, a bad pair reported while
the others finish, and the same files as ``unireg register``."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import oblique_affine, smooth_image

from unireg.cli import main

FILES = ("warped.nii.gz", "warped_labels.nii.gz", "transform.nii.gz", "affine.mat")


def _write(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path.name


@pytest.fixture
def cohort(tmp_path):
    """Three small subjects (image + labels) and a pairs CSV of four ordered pairs, paths
    relative to the CSV, plus a fifth pair whose moving image is corrupt. The subjects are
    one image placed differently in the world."""
    rows = []
    subjects = []
    for i in range(3):
        vol = smooth_image((24, 26, 22), seed=10)[0, 0].numpy().astype(np.float32)
        aff = oblique_affine((2.0, 2.0, 2.0), (3 * i, -2 * i, i), (-24, -26, -22))
        labels = (vol > np.percentile(vol, 60)).astype(np.int16) + (vol > np.percentile(vol, 85))
        subjects.append((_write(tmp_path / f"s{i}.nii.gz", vol, aff),
                         _write(tmp_path / f"s{i}_labels.nii.gz", labels, aff)))  # fmt: skip
    for a, b in [(0, 1), (1, 0), (0, 2), (2, 1)]:
        rows.append({"fixed": subjects[a][0], "moving": subjects[b][0],
                     "fixed_labels": subjects[a][1], "moving_labels": subjects[b][1]})  # fmt: skip
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    rows.append({"fixed": subjects[0][0], "moving": "broken.nii.gz", "fixed_labels": "",
                 "moving_labels": ""})  # fmt: skip
    with open(tmp_path / "pairs.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return tmp_path / "pairs.csv"


def _summary(out):
    with open(out / "summary.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _run(pairs, out, *extra):
    return main(["batch", str(pairs), "-o", str(out), "--method", "affine-gn", "--no-hd95",
                 "--quiet", "--workers", "0", *extra])  # fmt: skip


def test_bad_pair_reported_others_done_and_rerun_skips_them(cohort, tmp_path):
    out = tmp_path / "out"
    assert _run(cohort, out) == 1  # one pair failed: exit status 1, the rest finished
    rows = _summary(out)
    assert [r["status"] for r in rows] == ["done"] * 4 + ["failed"]
    assert "broken.nii.gz" in rows[4]["error"]
    for r in rows[:4]:
        folder = out / r["id"]
        assert {p.name for p in folder.iterdir()} >= {*FILES, "metrics.json", "manifest.json"}
        metrics = json.loads((folder / "metrics.json").read_text())
        assert float(r["dice_mean"]) == pytest.approx(metrics["dice_mean"])
        assert metrics["dice_mean"] > 0.5
    assert not (out / rows[4]["id"]).exists()  # nothing half-written for the bad pair
    stamps = {r["id"]: (out / r["id"] / "manifest.json").stat().st_mtime_ns for r in rows[:4]}
    # run again: the done pairs are skipped (their files untouched), the bad one retried
    assert _run(cohort, out) == 1
    again = _summary(out)
    assert [r["status"] for r in again] == ["done"] * 4 + ["failed"]
    for pid, stamp in stamps.items():
        assert (out / pid / "manifest.json").stat().st_mtime_ns == stamp
    # another method spec is not "done": it is computed again
    assert _run(cohort, out, "--preset", "accurate") == 1
    for pid, stamp in stamps.items():
        assert (out / pid / "manifest.json").stat().st_mtime_ns != stamp


def test_interrupted_run_resumes_to_the_uninterrupted_result(cohort, tmp_path, monkeypatch):
    import unireg.cli.register as register

    whole = tmp_path / "whole"
    _run(cohort, whole)
    calls = {"n": 0}
    real = register.compute

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(register, "compute", interrupted)
    assert _run(cohort, resumed) == 130  # Ctrl-C
    rows = _summary(resumed)
    assert [r["status"] for r in rows] == ["done", "done", "pending", "pending", "pending"]
    assert not (resumed / rows[2]["id"]).exists()  # the pair in flight left nothing
    monkeypatch.setattr(register, "compute", real)
    assert _run(cohort, resumed) == 1
    assert [r["status"] for r in _summary(resumed)] == ["done"] * 4 + ["failed"]
    for r in rows[:4]:
        for name in FILES:  # byte-identical to the uninterrupted run
            assert (resumed / r["id"] / name).read_bytes() == (whole / r["id"] / name).read_bytes()


def test_batch_matches_register_and_loader_processes(cohort, tmp_path):
    out = tmp_path / "out"
    with open(cohort, newline="") as fh:
        first = next(csv.DictReader(fh))
    assert main(["batch", str(cohort), "-o", str(out), "--method", "affine-gn", "--no-hd95",
                 "--quiet", "--workers", "2"]) == 1  # fmt: skip
    pid = _summary(out)[0]["id"]
    single = tmp_path / "single"
    base = cohort.parent
    assert main(["register", str(base / first["fixed"]), str(base / first["moving"]), "-o",
                 str(single), "--method", "affine-gn", "--fixed-labels",
                 str(base / first["fixed_labels"]), "--moving-labels",
                 str(base / first["moving_labels"]), "--no-hd95", "--quiet"]) == 0  # fmt: skip
    for name in FILES:
        assert (out / pid / name).read_bytes() == (single / name).read_bytes()


def test_bad_pairs_file_refused_before_any_work(tmp_path):
    bad = tmp_path / "pairs.csv"
    bad.write_text("a,b\nx,y\n")
    assert main(["batch", str(bad), "-o", str(tmp_path / "out"), "--quiet"]) == 1
    assert not (tmp_path / "out").exists()
    dup = tmp_path / "dup.csv"
    dup.write_text("fixed,moving,id\na.nii.gz,b.nii.gz,p\nb.nii.gz,a.nii.gz,p\n")
    assert main(["batch", str(dup), "-o", str(tmp_path / "out"), "--quiet"]) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="gloo on Linux")
def test_batch_under_torchrun_shares_the_pairs_and_writes_one_summary(cohort, tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "unireg", "batch", str(cohort), "-o", str(out), "--method", "affine-gn",
           "--no-hd95", "--quiet", "--workers", "0"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode != 0 and "1 of 5 pairs failed" in run.stderr  # rank 0's verdict
    rows = _summary(out)
    assert [r["status"] for r in rows] == ["done"] * 4 + ["failed"]
    single = tmp_path / "single"
    _run(cohort, single)
    for r in rows[:4]:
        assert (out / r["id"] / "metrics.json").exists()
        a = json.loads((out / r["id"] / "metrics.json").read_text())
        b = json.loads((single / r["id"] / "metrics.json").read_text())
        assert a["dice_mean"] == pytest.approx(b["dice_mean"], abs=1e-3)


def test_batch_size_groups_network_passes_with_the_same_result(cohort, tmp_path):
    # sitreg's register_many stacks the pairs into one network pass: the same transforms as
    # one pass per pair, up to float rounding (measured on IXI pairs: at most 0.002 mm)
    one, three = tmp_path / "one", tmp_path / "three"
    base = ["--method", "sitreg", "--no-hd95", "--quiet", "--workers", "0"]
    assert main(["batch", str(cohort), "-o", str(one), *base]) == 1
    assert main(["batch", str(cohort), "-o", str(three), *base, "--batch-size", "3"]) == 1
    rows = _summary(three)
    assert [r["status"] for r in rows] == ["done"] * 4 + ["failed"]  # groups of 3, then 1
    for r in rows[:4]:
        a = np.asarray(nib.load(one / r["id"] / "transform.nii.gz").dataobj)
        b = np.asarray(nib.load(three / r["id"] / "transform.nii.gz").dataobj)
        assert np.abs(a - b).max() < 0.01, r["id"]
        ma = json.loads((one / r["id"] / "metrics.json").read_text())
        mb = json.loads((three / r["id"] / "metrics.json").read_text())
        assert mb["dice_mean"] == pytest.approx(ma["dice_mean"], abs=1e-3)
