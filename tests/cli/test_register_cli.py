"""``unireg register`` with the training-free methods: the files of the contract, their
readability by ANTsPy, and clear errors that leave nothing behind."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import oblique_pair, shared_file, write_nifti

from unireg.cli import main
from unireg.io import load_image, load_labels, resample
from unireg.io.transforms import load_transforms
from unireg.metrics import label_metrics
from unireg.solvers.api import fit_levels


@pytest.fixture
def pair(tmp_path):
    """A small 3D pair on different oblique grids, with label maps."""
    return oblique_pair(tmp_path, (28, 30, 26), 4, (-28, -30, -28), (6, -4, 5), (-25, -32, -27))


def test_fit_levels_keeps_coarse_levels_for_brains_and_clamps_small_images():
    brain = fit_levels([(8, 60), (4, 60), (2, 40)], (120, 120, 90))
    assert [lv.factor for lv in brain] == [8, 4, 2]
    small = fit_levels([(8, 60), (4, 30), (2, 40)], (32, 32, 32))
    assert [(lv.factor, lv.iterations) for lv in small] == [(2, 60)]


def test_register_writes_the_contract_and_ants_reproduces_the_warp(pair, tmp_path):
    ants = pytest.importorskip("ants")
    f, m, fl, ml = pair
    out = tmp_path / "out"
    rc = main(["register", str(f), str(m), "-o", str(out), "--method", "syn",
               "--deformable", "svf", "--fixed-labels", str(fl), "--moving-labels", str(ml),
               "--quiet"])  # fmt: skip
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"warped.nii.gz", "warped_labels.nii.gz", "transform.nii.gz", "affine.mat",
                     "inverse_transform.nii.gz", "metrics.json", "manifest.json"}  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    flab, mlab = load_labels(fl), load_labels(ml)
    before = label_metrics(flab, resample(mlab, flab.geometry), hd95=False)["dice_mean"]
    assert metrics["dice_mean"] > 0.85 and metrics["dice_mean"] > before + 0.2
    assert metrics["label_interpolation"] == "nearest"
    assert metrics["folding_percent"] == 0.0
    # ANTs applies transform.nii.gz and reproduces warped.nii.gz
    warped = load_image(out / "warped.nii.gz").data[0].numpy()
    fixed_a, moving_a = ants.image_read(str(f)), ants.image_read(str(m))
    by_ants = ants.apply_transforms(fixed_a, moving_a, [str(out / "transform.nii.gz")]).numpy()
    inside = warped > 0.05 * warped.max()
    assert np.corrcoef(warped[inside], by_ants[inside])[0, 1] > 0.999
    # the label map keeps label values, and unireg apply gives the same file back
    wl = load_labels(out / "warped_labels.nii.gz").data
    assert set(torch.unique(wl).tolist()) <= {0, 1, 2}
    # forward then inverse is the identity at the fixed grid's centre (world mm)
    fwd = load_transforms([out / "transform.nii.gz"])
    inv = load_transforms([out / "inverse_transform.nii.gz"])
    x = torch.tensor([[0.0, 0.0, 0.0], [5.0, -3.0, 4.0]], dtype=torch.float64)
    assert float((inv.map_points(fwd.map_points(x)) - x).abs().max()) < 0.5


def test_register_affine_mat_is_read_by_ants(pair, tmp_path):
    ants = pytest.importorskip("ants")
    f, m, _, _ = pair
    out = tmp_path / "aff"
    assert main(["register", str(f), str(m), "-o", str(out), "--method", "affine", "-q"]) == 0
    fixed_a, moving_a = ants.image_read(str(f)), ants.image_read(str(m))
    a = ants.apply_transforms(fixed_a, moving_a, [str(out / "affine.mat")]).numpy()
    b = ants.apply_transforms(fixed_a, moving_a, [str(out / "transform.nii.gz")]).numpy()
    inside = a > 0.05 * a.max()
    assert np.corrcoef(a[inside], b[inside])[0, 1] > 0.9999


def test_register_errors_name_the_file_and_leave_nothing(pair, tmp_path, capsys):
    f, m, fl, ml = pair
    flat = write_nifti(tmp_path / "flat.nii.gz", np.zeros((20, 20), np.float32), np.eye(4))
    out = tmp_path / "bad"
    assert main(["register", str(f), str(flat), "-o", str(out), "-q"]) == 1
    assert "flat.nii.gz" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
    # a label map on another grid than its image
    labels = ["--fixed-labels", str(ml), "--moving-labels", str(ml)]
    assert main(["register", str(f), str(m), "-o", str(out), *labels, "-q"]) == 1
    err = capsys.readouterr().err
    assert "GridMismatchError" in err and "moving_labels.nii.gz" in err
    assert not out.exists() or not any(out.iterdir())
    assert main(["register", str(f), str(tmp_path / "nope.nii.gz"), "-o", str(out), "-q"]) == 1
    assert "nope.nii.gz" in capsys.readouterr().err


@pytest.mark.slow
def test_register_real_ixi_pair_beats_no_registration(tmp_path):
    f = shared_file("ixi", "t1", "IXI012-HH-1211-T1_ds.nii.gz")
    m = shared_file("ixi", "t1", "IXI013-HH-1212-T1_ds.nii.gz")
    fl = shared_file("ixi", "labels", "IXI012-HH-1211-T1_ds_DLMUSE.nii.gz")
    ml = shared_file("ixi", "labels", "IXI013-HH-1212-T1_ds_DLMUSE.nii.gz")
    out = tmp_path / "ixi"
    assert main(["register", str(f), str(m), "-o", str(out), "--method", "syn", "--no-hd95",
                 "--fixed-labels", str(fl), "--moving-labels", str(ml), "-q"]) == 0  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    # measured 0.55-0.64 on the IXI pairs (no registration: 0.04-0.2; ANTs SyN: 0.59-0.63)
    assert metrics["dice_mean"] > 0.5
    assert metrics["folding_percent"] < 0.01


def test_metrics_json_and_the_manifest_record_version_command_and_inputs(pair, tmp_path):
    import hashlib

    from unireg import __version__
    from unireg.io.outputs import manifest_problems

    f, m, fl, ml = pair
    out = tmp_path / "prov"
    argv = ["register", str(f), str(m), "-o", str(out), "--method", "affine",
            "--fixed-labels", str(fl), "--moving-labels", str(ml), "-q"]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert metrics["unireg_version"] == manifest["unireg_version"] == __version__
    assert metrics["command"] == manifest["command"] == ["unireg", *argv]
    for key, path in (("fixed", f), ("moving", m), ("fixed_labels", fl), ("moving_labels", ml)):
        record = metrics["inputs"][key]
        assert record == manifest["inputs"][key]
        assert record["path"] == str(path.resolve()) and record["bytes"] == path.stat().st_size
        assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest_problems(out) == []
    # a rerun with another method replaces everything: no inverse_transform.nii.gz of the first
    assert main(["register", str(f), str(m), "-o", str(out), "--method", "syn", "-q"]) == 0
    names = {p.name for p in out.iterdir()}
    assert "warped_labels.nii.gz" not in names and manifest_problems(out) == []
    assert json.loads((out / "metrics.json").read_text())["method"] == "syn"


@pytest.mark.slow
def test_register_killed_while_writing_keeps_the_earlier_result(pair, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from unireg.io.outputs import manifest_problems

    f, m, _, _ = pair
    out = tmp_path / "out"
    assert main(["register", str(f), str(m), "-o", str(out), "--method", "affine", "-q"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    cmd = [sys.executable, "-m", "unireg", "register", str(f), str(m), "-o", str(out),
           "--method", "syn", "--report", "-q"]  # fmt: skip
    proc = subprocess.Popen(cmd)
    deadline = time.time() + 120
    while not any(".unireg-stage-" in p.name for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.time() < deadline, "the run ended before staging"
        time.sleep(0.01)
    time.sleep(0.3)  # inside the run: loading, registering or writing
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # the next run cleans what the killed one left and publishes a whole result
    assert main(["register", str(f), str(m), "-o", str(out), "--method", "syn", "-q"]) == 0
    assert [p.name for p in tmp_path.iterdir() if ".unireg-" in p.name] == []
    assert manifest_problems(out) == []
