"""Metrics: hand-computed cases (anisotropic spacing), MONAI as an independent implementation,
Jacobian statistics of known transforms, consistency, TRE, and `unireg metrics`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import oblique_affine, shared_file

from unireg import metrics as M
from unireg.cli import main
from unireg.io.image import LabelMap, load_labels, save_image
from unireg.result import RegistrationResult
from unireg.spatial.affine import affine_from_parameters
from unireg.spatial.geometry import Geometry
from unireg.spatial.transform import AffineTransform, DisplacementFieldTransform


def boxes() -> tuple[np.ndarray, np.ndarray]:
    a = np.zeros((30, 24, 20), np.int64)
    b = np.zeros_like(a)
    a[5:15, 4:14, 3:13] = 1  # 10x10x10 cube
    b[7:17, 4:14, 3:13] = 1  # shifted by 2 voxels along axis 0: overlap 8x10x10
    a[20:25, 15:20, 10:15] = 7
    b[20:25, 15:20, 10:15] = 7  # identical
    a[1:3, 1:3, 1:3] = 4  # missing from b
    return a, b


def test_dice_hand_computed():
    a, b = boxes()
    d = M.dice(a, b)
    assert d == {1: pytest.approx(0.8), 4: 0.0, 7: 1.0}
    chosen = M.dice(a, b, labels=[1, 9])
    assert chosen[1] == pytest.approx(0.8) and math.isnan(chosen[9])  # 9 is in neither map
    out = M.label_metrics(a, b, spacing=(1, 1, 1))
    assert out["dice_mean"] == pytest.approx((0.8 + 0 + 1) / 3)
    assert out["num_labels"] == 3


def test_hd95_single_voxels_anisotropic():
    a = np.zeros((10, 10, 12), np.int64)
    b = np.zeros_like(a)
    a[2, 3, 4] = 1
    b[5, 3, 8] = 1
    spacing = (1.5, 1.0, 2.5)
    expected = math.hypot(3 * 1.5, 4 * 2.5)
    assert M.hausdorff95(a, b, spacing=spacing)[1] == pytest.approx(expected)
    assert M.hausdorff95(a, a, spacing=spacing)[1] == 0.0
    assert math.isnan(M.hausdorff95(a, np.zeros_like(a), spacing=spacing)[1])


def test_hd95_shifted_box_anisotropic():
    a, b = boxes()
    # a shift of 2 voxels along axis 0 at 2.5 mm: surface distances are 0 (shared faces) or
    # 5 mm (the shifted end faces), and more than 5% of the surface is shifted -> 5 mm
    h = M.hausdorff95(a, b, labels=[1, 7], spacing=(2.5, 1.0, 0.7))
    assert h[1] == pytest.approx(5.0)
    assert h[7] == 0.0


def test_dice_and_hd95_match_monai_on_ellipsoids():
    monai_metrics = pytest.importorskip("monai.metrics")
    z, y, x = np.mgrid[:40, :36, :30]
    a = np.zeros((40, 36, 30), np.int64)
    b = np.zeros_like(a)
    a[((z - 20) / 10) ** 2 + ((y - 18) / 8) ** 2 + ((x - 15) / 6) ** 2 < 1] = 1
    b[((z - 22) / 9) ** 2 + ((y - 17) / 8) ** 2 + ((x - 15) / 7) ** 2 < 1] = 1
    a[5:12, 5:10, 5:25] = 2
    b[6:12, 5:11, 4:25] = 2
    spacing = (1.5, 0.8, 2.5)

    def oh(lab):
        return torch.nn.functional.one_hot(torch.as_tensor(lab), 3).permute(3, 0, 1, 2)[None]

    ref_h = monai_metrics.compute_hausdorff_distance(
        oh(b), oh(a), include_background=False, percentile=95, spacing=spacing
    )[0]
    ref_d = monai_metrics.compute_dice(oh(b), oh(a), include_background=False)[0]
    h = M.hausdorff95(a, b, spacing=spacing)
    d = M.dice(a, b)
    assert [h[1], h[2]] == pytest.approx(ref_h.tolist(), abs=1e-4)  # MONAI works in float32
    assert [d[1], d[2]] == pytest.approx(ref_d.tolist(), abs=1e-6)


def test_jacobian_stats_of_known_affines_on_oblique_grids():
    geom = Geometry((12, 10, 8), oblique_affine((1.2, 0.9, 2.0), (10, -20, 30), (5, -3, 8)))
    scale = torch.tensor([[1.5, 0.8, 1.25]], dtype=torch.float64)
    m = affine_from_parameters(
        rotation=torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64),
        scale=scale,
        translation=torch.tensor([[3.0, -1.0, 2.0]], dtype=torch.float64),
    )[0]
    stats = M.jacobian_stats(M.transform_jacobian(AffineTransform(m), geom))
    # from the float32 displacement (mm): exact to single precision
    assert stats["jacobian_mean"] == pytest.approx(1.5 * 0.8 * 1.25, abs=1e-6)
    assert stats["jacobian_std"] < 1e-6
    assert stats["folding_percent"] == 0.0
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    assert M.jacobian_stats(M.transform_jacobian(AffineTransform(flip), geom))[
        "folding_percent"
    ] == pytest.approx(100.0)


def test_jacobian_stats_of_a_field_that_folds_half_the_grid():
    # world displacement u_0 = -2 x_0 on the half x_0 > 0 (so det = 1 - 2 = -1 there) and 0
    # elsewhere: a grid of spacing 2 mm along axis 0
    shape = (20, 6, 6)
    affine = np.diag([2.0, 1.0, 1.0, 1.0])
    affine[0, 3] = -19.0  # voxel centres at -19, -17, ..., 19 mm
    geom = Geometry(shape, affine)
    x0 = torch.tensor(-19.0 + 2.0 * np.arange(20)).view(-1, 1, 1).expand(shape)
    field = torch.zeros(3, *shape, dtype=torch.float64)
    field[0] = torch.where(x0 > 0, -2 * x0, torch.zeros_like(x0))
    det = M.transform_jacobian(DisplacementFieldTransform(field, geom), geom)
    interior = det[1:-1]
    assert float((interior[:8] - 1).abs().max()) < 1e-9  # x0 < -1: untouched
    assert float((interior[10:] + 1).abs().max()) < 1e-9  # x0 > 1: det -1
    stats = M.jacobian_stats(det)
    assert stats["folding_percent"] == pytest.approx(50.0, abs=5.0)
    mask = np.zeros(shape, bool)
    mask[:9] = True
    assert M.jacobian_stats(det, mask)["folding_percent"] == 0.0


def test_consistency_and_tre():
    geom = Geometry((8, 9, 10), oblique_affine((1.0, 1.5, 2.0), (5, 0, -10), (0, 0, 0)))
    m = affine_from_parameters(
        rotation=torch.tensor([[0.2, 0.1, -0.3]], dtype=torch.float64),
        translation=torch.tensor([[4.0, 2.0, -1.0]], dtype=torch.float64),
    )[0].numpy()
    fwd = AffineTransform(m)
    ic = M.consistency_error([fwd, fwd.inverse()], geom)
    assert ic["max_mm"] < 1e-9
    shift = np.eye(4)
    shift[:3, 3] = [0.0, 3.0, 4.0]  # the inverse is off by a 5 mm translation
    off = AffineTransform(shift @ np.asarray(fwd.inverse().matrix))
    err = M.consistency_error([fwd, off], geom)
    assert err["mean_mm"] == pytest.approx(5.0) and err["max_mm"] == pytest.approx(5.0)
    pts_f = np.array([[0.0, 0.0, 0.0], [10.0, -5.0, 3.0], [-20.0, 4.0, 8.0]])
    pts_m = fwd.map_points(torch.from_numpy(pts_f)).numpy()
    pts_m[1] += [0.0, 0.0, 2.0]
    tre = M.target_registration_error(fwd, pts_f, pts_m)
    assert tre["tre_per_point_mm"] == pytest.approx([0.0, 2.0, 0.0], abs=1e-9)
    assert tre["tre_mean_mm"] == pytest.approx(2 / 3)
    assert tre["tre_max_mm"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="matched"):
        M.target_registration_error(fwd, pts_f, pts_m[:2])


def test_registration_metrics_for_a_result():
    a, b = boxes()
    affine = np.diag([2.0, 1.0, 1.5, 1.0])
    fixed = LabelMap(torch.from_numpy(a)[None], affine)
    moving = LabelMap(torch.from_numpy(b)[None], affine)
    # moving = fixed shifted by +2 voxels (4 mm) along axis 0: the transform x -> x + 4 mm
    # maps the fixed cube onto the moving cube
    shift = np.eye(4)
    shift[0, 3] = 4.0
    result = RegistrationResult(
        AffineTransform(shift),
        fixed.geometry,
        moving.geometry,
        inverse=AffineTransform(np.linalg.inv(shift)),
        elapsed=1.25,
    )
    out = M.registration_metrics(result, fixed_labels=fixed, moving_labels=moving)
    assert out["dice_1"] == pytest.approx(1.0) and out["dice_7"] < 1.0
    assert out["hd95_1"] == 0.0
    assert out["label_interpolation"] == "nearest"
    assert out["folding_percent"] == 0.0 and out["jacobian_std"] < 1e-9
    assert out["inverse_consistency_max_mm"] < 1e-9
    assert out["time_s"] == 1.25
    # a reverse registration that is off by 1 mm along axis 1: cycle error 1 mm everywhere
    back = np.linalg.inv(shift)
    back[1, 3] += 1.0
    cyc = M.registration_metrics(result, reverse=AffineTransform(back))
    assert cyc["cycle_consistency_mean_mm"] == pytest.approx(1.0)
    assert "dice_mean" not in cyc
    identity = M.registration_metrics(
        transform=AffineTransform.identity(3),
        fixed=fixed.geometry,
        fixed_labels=fixed,
        moving_labels=moving,
    )
    assert identity["dice_1"] == pytest.approx(0.8)
    text = json.dumps(M.json_ready(out), allow_nan=False)
    assert json.loads(text)["dice_4"] == 0.0
    with pytest.raises(ValueError, match="both"):
        M.registration_metrics(result, fixed_labels=fixed)


def _write_labels(path, array, affine):
    save_image(LabelMap(torch.from_numpy(array)[None], affine), path)
    return path


def test_cli_metrics_same_and_different_grids(tmp_path, capsys):
    a, b = boxes()
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    fa = _write_labels(tmp_path / "a.nii.gz", a, affine)
    fb = _write_labels(tmp_path / "b.nii.gz", b, affine)
    assert main(["metrics", "--fixed-labels", str(fa), "--moving-labels", str(fb), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["resampled_to_fixed_grid"] is False
    assert out["dice_1"] == pytest.approx(0.8) and out["dice_mean"] == pytest.approx(0.6)
    assert out["hd95_1"] == pytest.approx(3.0)  # 2 voxels x 1.5 mm
    # the same anatomy on a grid of half the size (2x coarser along axis 0): resampled
    coarse = np.ascontiguousarray(a[::2])
    affine2 = affine.copy()
    affine2[0, 0] = 3.0
    affine2[0, 3] = 0.75  # voxel centres midway between the fine ones
    fc = _write_labels(tmp_path / "c.nii.gz", coarse, affine2)
    assert main(["metrics", "--fixed-labels", str(fa), "--moving-labels", str(fc)]) == 0
    text = capsys.readouterr().out
    assert "resampled onto the fixed grid with nearest neighbour" in text
    assert "mean Dice" in text and "mean HD95" in text
    assert (
        main(["metrics", "--fixed-labels", str(fa), "--moving-labels", str(tmp_path / "x.nii.gz")])
        == 1
    )
    assert "x.nii.gz" in capsys.readouterr().err


def test_metrics_on_real_labels_agree_with_cli(capsys):
    fixed = shared_file("ixi", "labels", "IXI012-HH-1211-T1_ds_DLMUSE.nii.gz")
    lab = load_labels(fixed)
    assert (
        main(["metrics", "--fixed-labels", str(fixed), "--moving-labels", str(fixed), "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["num_labels"] == len([v for v in lab.labels() if v != 0])
    assert out["dice_mean"] == 1.0 and out["hd95_mean"] == 0.0
