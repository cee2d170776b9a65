"""The evaluation harness end to end (2D and 3D), the misalignment protocol, the report and the
demo."""

from __future__ import annotations

import csv
import math

import nibabel as nib
import numpy as np
import pytest
from conftest import smooth_image

from unireg.cli import main
from unireg.evaluation import (
    MethodSpec,
    covering_geometry,
    make_method,
    misalignment,
    pairs_from_csv,
    summarize,
)
from unireg.evaluation.methods import AntsMethod, MissingPeerError, SimpleITKMethod
from unireg.spatial import Geometry


def _head(shape, seed):
    """A blob image that vanishes at the border, and its two-label map."""
    vol = smooth_image(shape, seed=seed)[0, 0].numpy()
    axes = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    vol = vol * np.exp(-sum(a**4 for a in axes) / 0.2)
    labels = (vol > np.percentile(vol, 70)).astype(np.int16) + (vol > np.percentile(vol, 90))
    return vol.astype(np.float32), labels


def _case(tmp_path, shape):
    d = len(shape)
    aff = np.diag([2.0] * d + [1.0])
    if d == 2:  # NIfTI is 3D at heart: a 2D image is (X, Y) with a 4x4 affine
        aff4 = np.eye(4)
        aff4[:2, :2], aff4[:2, 3] = aff[:2, :2], aff[:2, 2]
        aff = aff4
    rows = []
    for i, seed in enumerate((1, 1)):  # the same anatomy twice: registration can be perfect
        vol, lab = _head(shape, seed)
        nib.save(nib.Nifti1Image(vol, aff), str(tmp_path / f"img{i}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, aff), str(tmp_path / f"lab{i}.nii.gz"))
    rows.append("fixed,moving,fixed_labels,moving_labels")
    rows.append("img0.nii.gz,img1.nii.gz,lab0.nii.gz,lab1.nii.gz")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "pairs.csv"


@pytest.mark.parametrize("shape", [(48, 44), (28, 26, 24)])
def test_evaluate_end_to_end_with_a_peer(tmp_path, shape, capsys):
    pairs = _case(tmp_path, shape)
    methods = ["none", "unireg:rigid"]
    if AntsMethod.available():
        methods.append("ants:Rigid")
    if SimpleITKMethod.available():
        methods.append("sitk:rigid")
    out = tmp_path / "eval"
    rc = main(["evaluate", "--pairs", str(pairs), "--methods", *methods, "--angles", "0", "40",
               "-o", str(out), "-q", "--no-hd95"])  # fmt: skip
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"pairs.csv", "summary.csv", "summary.md", "dice_vs_angle.png",
                     "dice_boxplot.png", "manifest.json"}  # fmt: skip
    from unireg.io.outputs import manifest_problems

    assert manifest_problems(out) == []  # published as one transaction
    rows = list(csv.DictReader((out / "pairs.csv").open()))
    assert len(rows) == 2 * len(methods)
    dice = {(r["method"], float(r["angle"])): float(r["dice_mean"]) for r in rows}
    assert dice[("none", 0.0)] > 0.999  # identical images
    assert dice[("none", 40.0)] < 0.8  # the known misalignment lowers Dice
    # unireg's rigid registration undoes it; the peer ran on the same cases (ANTs' default
    # Rigid schedule is not tuned for 48-pixel toys, so its accuracy is not asserted here)
    assert dice[("unireg:rigid", 40.0)] > dice[("none", 40.0)] + 0.1, dice
    for m in methods:
        assert all(math.isfinite(dice[(m, a)]) for a in (0.0, 40.0))
    md = (out / "summary.md").read_text()
    assert "| none | 40 | 1 |" in md
    if not AntsMethod.available():
        pytest.skip("antspyx not installed: the peer was not run")


def test_missing_peer_is_reported_clearly(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(AntsMethod, "available", staticmethod(lambda: False))
    with pytest.raises(MissingPeerError, match="unireg\\[peers\\]"):
        make_method("ants:SyN")
    pairs = _case(tmp_path, (32, 30))
    rc = main(["evaluate", "--pairs", str(pairs), "--methods", "none", "ants:SyN",
               "-o", str(tmp_path / "e"), "-q", "--no-hd95"])  # fmt: skip
    assert rc == 0
    assert "skipping ants:SyN" in capsys.readouterr().err


def test_method_specs_parse_options():
    spec = MethodSpec.parse("unireg:syn:preset=accurate:deformable=svf:seed=3")
    assert (spec.family, spec.name) == ("unireg", "syn")
    assert spec.options == {"preset": "accurate", "deformable": "svf", "seed": 3}
    with pytest.raises(Exception, match="key=value"):
        MethodSpec.parse("unireg:syn:oops")
    with pytest.raises(Exception, match="unknown method 'elastix'"):
        make_method("elastix:bspline")


def test_misalignment_rotates_by_the_angle_about_the_centre():
    geom = Geometry((40, 50, 30), np.diag([1.0, 1.2, 2.0, 1.0]))
    for angle, axes in [(90.0, 1), (135.0, 2), (180.0, 3)]:
        m, chosen = misalignment(geom, angle, axes=axes, seed=5)
        assert len(chosen) == axes
        lin = m[:3, :3]
        assert np.allclose(lin @ lin.T, np.eye(3), atol=1e-12)
        c = geom.center_world
        assert np.allclose(m[:3, :3] @ c + m[:3, 3], c)  # the centre stays
        if axes == 1:  # one axis: the rotation angle is the angle asked for
            assert math.isclose(math.degrees(math.acos((np.trace(lin) - 1) / 2)), angle)
    # same seed, same misalignment; the covering grid holds the rotated field of view
    assert np.array_equal(misalignment(geom, 45, seed=1)[0], misalignment(geom, 45, seed=1)[0])
    cover = covering_geometry(geom)
    assert min(cover.shape) * min(cover.spacing) >= np.linalg.norm([39, 59.4, 58])


def test_summary_statistics_match_hand_computed_values():
    rows = [
        {"method": "a", "angle": 0, "dice_mean": 0.5, "time_s": 1.0},
        {"method": "a", "angle": 0, "dice_mean": 0.7, "time_s": 3.0},
    ]
    for r in rows:
        for k in ("hd95_mean", "folding_percent", "jacobian_std", "inverse_consistency_mean_mm",
                  "peak_memory_mb"):  # fmt: skip
            r[k] = float("nan")
    (s,) = summarize(rows)
    assert s["pairs"] == 2
    assert math.isclose(s["dice_mean_mean"], 0.6) and math.isclose(s["dice_mean_std"], 0.1)
    assert math.isnan(s["hd95_mean_mean"])


def test_pairs_csv_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(Exception, match="bad.csv"):
        pairs_from_csv(bad)


@pytest.mark.slow
def test_demo_runs_on_the_shipped_brains(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--method", "affine"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"warped.nii.gz", "transform.nii.gz", "report.png", "report.html",
            "metrics.md"} <= names  # fmt: skip
    # the page names the DLMUSE labels, and view rebuilds it from the recorded inputs
    assert '"name": "3rdVentricle"' in (out / "report.html").read_text()
    assert main(["view", str(out), "-o", str(tmp_path / "again.html"), "-q"]) == 0
    table = (out / "metrics.md").read_text()
    dice = {line.split("|")[1].strip(): float(line.split("|")[4].split("±")[0])
            for line in table.splitlines()[2:]}  # fmt: skip
    assert dice["unireg:affine"] > dice["none"] + 0.2


def test_report_draws_every_panel_with_keypoints(tmp_path):
    import matplotlib.image as mpimg
    import torch

    from unireg.io.image import Image
    from unireg.report import registration_report
    from unireg.solvers import register

    vol, _ = _head((24, 26, 22), seed=2)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    fixed = Image(torch.from_numpy(vol)[None], aff)
    result = register(fixed, fixed, "affine")
    result.extras.keypoints_fixed = np.array([[24.0, 26.0, 22.0], [10.0, 12.0, 20.0]])
    path = registration_report(result, fixed, fixed, tmp_path / "r.png", metrics={"dice_mean": 1})
    img = mpimg.imread(path)
    assert img.shape[0] > 300 and img.shape[1] > 1000  # 3 rows x 7 panels
    assert not list(tmp_path.glob(".r.png.*"))  # written atomically, no temporary left


def test_measure_reports_time_and_memory_growth():
    import mmap
    import time

    from unireg.profiling import Measure

    size = 64 * 2**20
    with Measure() as m:
        block = mmap.mmap(-1, size)  # fresh pages: new resident memory once touched
        block.write(b"\x01" * size)
        time.sleep(0.01)
    assert m.seconds >= 0.01
    if m.peak_bytes is not None:  # Linux: growth of the peak resident set
        assert m.peak_bytes >= 48 * 2**20
    block.close()


def test_evaluate_warms_each_method_up_once_and_refuses_a_missing_device(tmp_path, capsys):
    """``warmup`` registers the first pair once per method, unrecorded, before the run (GPU
    times per pair are then warm); ``--device`` is checked before any work."""
    import torch

    from unireg.evaluation import evaluate

    pairs = pairs_from_csv(_case(tmp_path, (28, 26, 24)))
    calls = []

    class Counted:
        def __init__(self, spec):
            self.inner = make_method(spec)
            self.label = self.inner.label

        def register(self, fixed, moving, *, seed=0):
            calls.append(self.label)
            return self.inner.register(fixed, moving, seed=seed)

    methods = [Counted("none"), Counted("unireg:affine-gn")]
    cold = evaluate(pairs, methods, progress=False)
    assert calls == ["none", "unireg:affine-gn"]
    calls.clear()
    warm = evaluate(pairs, methods, progress=False, warmup=True)
    assert calls == ["none", "unireg:affine-gn"] * 2 and len(warm) == len(cold) == 2
    assert [r["dice_mean"] for r in warm] == [r["dice_mean"] for r in cold]
    out = tmp_path / "gpu"
    if not torch.cuda.is_available():
        code = main(["evaluate", "--pairs", str(tmp_path / "pairs.csv"), "--methods", "none",
                     "--device", "cuda", "-o", str(out), "--quiet"])  # fmt: skip
        assert code != 0 and "CUDA is not available" in capsys.readouterr().err
        assert not out.exists()
    code = main(["evaluate", "--pairs", str(tmp_path / "pairs.csv"), "--methods", "none",
                 "--device", "gpu", "-o", str(out), "--quiet"])  # fmt: skip
    assert code != 0 and "--device gpu: not a device" in capsys.readouterr().err
    assert not out.exists()
