"""SITReg inference on images: the affine stage composed into the written transform, both
directions, the "complete" variant, the CLI contract and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import demo_brains
from test_keymorph import _tiny_manifest

from unireg.io import load_image, load_labels
from unireg.io.transforms import load_transforms
from unireg.methods.sitreg import SITReg, register_sitreg
from unireg.metrics import consistency_error
from unireg.spatial.field import world_points
from unireg.spatial.grid import transform_points
from unireg.spatial.transform import AffineTransform
from unireg.training.checkpoint import Checkpoint, save_checkpoint

PREP = {"spacing_mm": 2.0, "shape": [24, 24, 24], "center": "mass"}


def _model(seed: int = 0, std: float = 0.05) -> SITReg:
    torch.manual_seed(seed)
    net = SITReg(3, channels=(4, 8, 8), hidden=8, tol=1e-4)
    for upd in net.updates:  # leave the identity initialisation: a real deformation
        for p in upd.parameters():
            torch.nn.init.normal_(p, std=std)
    return net.eval()


def test_register_sitreg_composes_the_affine_stage_and_gives_both_directions(tmp_path):
    _tiny_manifest(tmp_path)
    fixed, moving = load_image(tmp_path / "s0.nii.gz"), load_image(tmp_path / "s1.nii.gz")
    net = _model()
    res = register_sitreg(
        fixed, moving, model=net, checkpoint=Checkpoint("sitreg", {}, {}, preprocessing=PREP)
    )
    affine = res.affine
    assert isinstance(affine, AffineTransform)
    # the transform is the network's field followed by the affine stage: x -> A(x + u(x));
    # the network moves points (it is not the identity), by less than its bound allows
    pts = torch.as_tensor(np.argwhere(np.ones(fixed.shape))[::97], dtype=torch.float64)
    world = torch.as_tensor(fixed.geometry.voxel_to_world[:3, :3]) @ pts.T
    world = (world.T + torch.as_tensor(fixed.geometry.voxel_to_world[:3, 3])).float()
    moved, lin = res.transform.map_points(world), affine.map_points(world)
    assert 0.05 < float((moved - lin).norm(dim=1).max()) < 24.0
    # forward then inverse is the identity up to interpolation: measured 0.0022 mean, 0.0056
    # p95 (mm, on the fixed grid, 2 mm voxels) for this random ~1 mm deformation
    err = consistency_error([res.transform, res.inverse], fixed.geometry)
    assert err["mean_mm"] < 0.01 and err["p95_mm"] < 0.02
    assert res.extras.stage_seconds["affine"] > 0
    # "complete" inference: the same deformation up to the resampling it avoids; measured in
    # world space the interpolation of the final fields dominates, so it is as consistent
    ckpt = Checkpoint("sitreg", {}, {}, preprocessing=PREP)
    comp = register_sitreg(fixed, moving, model=net, checkpoint=ckpt, inference="complete")
    diff = (comp.transform.map_points(world) - moved).norm(dim=1)
    assert float(diff.mean()) < 0.3
    err_c = consistency_error([comp.transform, comp.inverse], fixed.geometry)
    assert err_c["mean_mm"] < 0.01 and err_c["p95_mm"] < 0.02


def test_register_sitreg_holds_the_network_fields_with_their_faces_extended(tmp_path):
    # the result keeps the network's own fields (no resampling), extended beyond the network
    # grid G by their face values, over all the fixed grid (forward) and all the moving grid
    # mapped back by the affine stage (inverse): evaluated anywhere there, each equals the
    # network field sampled with its border held, in mm
    from unireg.spatial.warp import sample

    _tiny_manifest(tmp_path)
    fixed, moving = load_image(tmp_path / "s0.nii.gz"), load_image(tmp_path / "s1.nii.gz")
    res = register_sitreg(
        fixed, moving, model=_model(), checkpoint=Checkpoint("sitreg", {}, {}, preprocessing=PREP)
    )
    grid = res.extras.network_grid
    to_mm = torch.from_numpy(grid.normalized_to_world[:3, :3]).float()
    back = res.affine.inverse()
    for u, field, points in (
        (res.extras.network_fields[0], res.transform.transforms[0],
         world_points(fixed.geometry).reshape(-1, 3)),
        (res.extras.network_fields[1], res.inverse.transforms[1],
         back.map_points(world_points(moving.geometry).reshape(-1, 3))),
    ):  # fmt: skip
        local = transform_points(torch.from_numpy(grid.world_to_normalized).float(), points)
        assert float(local.abs().max()) > 1.05  # reaching beyond G
        expected = to_mm @ sample(u, local[None], padding="border")[0]
        got = field.map_points(points) - points
        assert float(expected.abs().max()) > 0.05
        torch.testing.assert_close(got, expected.T, atol=2e-4, rtol=0)


def _one_grid_pair(tmp_path):
    """Two subjects on one grid, a small network, and a payload whose network grid is centred
    on the field of view."""
    _tiny_manifest(tmp_path)
    img = load_image(tmp_path / "s0.nii.gz")
    other = img.with_data(load_image(tmp_path / "s2.nii.gz").data)
    payload = Checkpoint("sitreg", {}, {}, preprocessing={**PREP, "center": "fov"})
    return img, other, _model(seed=2), payload


def test_sitreg_swapped_images_give_the_swapped_deformations_on_the_network_grid(tmp_path):
    # without the affine stage, with both images on one grid and the network grid centred on
    # its field of view (not on the fixed image's centre of mass), swapping the inputs swaps
    # forward and inverse exactly: the network's symmetry, through the whole image pipeline
    img, other, net, payload = _one_grid_pair(tmp_path)
    ab = register_sitreg(img, other, model=net, checkpoint=payload, affine="none")
    ba = register_sitreg(other, img, model=net, checkpoint=payload, affine="none")
    (fwd_ab, inv_ab), (fwd_ba, inv_ba) = ab.extras.network_fields, ba.extras.network_fields
    assert float(fwd_ab.abs().max()) > 0.01
    assert torch.equal(fwd_ab, inv_ba) and torch.equal(inv_ab, fwd_ba)


def test_sitreg_resolution_matching_changes_only_pairs_of_different_resolution(tmp_path):
    from unireg.io.image import resample

    img, other, net, payload = _one_grid_pair(tmp_path)

    def fields(fixed, moving, match):
        res = register_sitreg(fixed, moving, model=net, checkpoint=payload, affine="none",
                              match_resolution=match)  # fmt: skip
        return res.extras.network_fields

    same = [fields(img, other, m) for m in (False, True)]
    assert all(torch.equal(a, b) for a, b in zip(*same, strict=True))
    # the moving image on 3x thicker slices: the fixed one is blurred to match, and the pair
    # swapped still gives the swapped fields (the matching is the pair's, not a side's)
    grid = other.geometry.regrid((*other.spacing[:2], 3 * other.spacing[2]))
    thick = resample(other, grid)
    plain, matched = fields(img, thick, False), fields(img, thick, True)
    assert not torch.equal(plain[0], matched[0])
    swapped = fields(thick, img, True)
    torch.testing.assert_close(swapped[0], matched[1], rtol=1e-4, atol=1e-5)


def test_register_cli_sitreg_writes_the_contract(tmp_path):
    from unireg.cli import main

    _tiny_manifest(tmp_path)
    ckpt = save_checkpoint(tmp_path / "m.pt", "sitreg", _model(), preprocessing=PREP)
    out = tmp_path / "out"
    rc = main(["register", str(tmp_path / "s0.nii.gz"), str(tmp_path / "s1.nii.gz"), "-o",
               str(out), "--method", "sitreg", "--model", str(ckpt), "--affine-stage", "rigid",
               "--fixed-labels", str(tmp_path / "s0_lab.nii.gz"), "--moving-labels",
               str(tmp_path / "s1_lab.nii.gz"), "--quiet", "--no-hd95"])  # fmt: skip
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"warped.nii.gz", "warped_labels.nii.gz", "transform.nii.gz", "affine.mat",
                     "inverse_transform.nii.gz", "metrics.json", "manifest.json"}  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "sitreg" and metrics["affine"] == "rigid"
    assert metrics["folding_percent"] == 0.0 and "inverse_consistency_mean_mm" in metrics
    assert set(torch.unique(load_labels(out / "warped_labels.nii.gz").data).tolist()) <= {0, 1, 2}
    ants = pytest.importorskip("ants")
    f = ants.image_read(str(tmp_path / "s0.nii.gz"))
    m = ants.image_read(str(tmp_path / "s1.nii.gz"))
    warped = load_image(out / "warped.nii.gz").data[0].numpy()
    by_ants = ants.apply_transforms(f, m, [str(out / "transform.nii.gz")]).numpy()
    # compare where the map lands at least a voxel inside the moving grid (ITK and torch treat
    # the last half voxel at the field-of-view edge differently)
    fixed_geom, moving_geom = load_image(tmp_path / "s0.nii.gz").geometry, load_image(
        tmp_path / "s1.nii.gz").geometry  # fmt: skip
    written = load_transforms([out / "transform.nii.gz"])
    world = world_points(fixed_geom, dtype=torch.float64).reshape(-1, 3)
    vox = transform_points(torch.as_tensor(moving_geom.world_to_voxel), written.map_points(world))
    size = torch.tensor(moving_geom.shape, dtype=torch.float64)
    deep = ((vox >= 1) & (vox <= size - 2)).all(1).reshape(fixed_geom.shape).numpy()
    inside = deep & (warped > 0.05 * warped.max())
    assert inside.sum() > 500
    assert np.corrcoef(warped[inside], by_ants[inside])[0, 1] > 0.999
    assert np.abs(warped[inside] - by_ants[inside]).max() < 1e-3 * warped.max()
    # the inverse, applied by ANTs to the fixed image, lands it on the moving grid
    back = ants.apply_transforms(m, f, [str(out / "inverse_transform.nii.gz")])
    assert back.shape == m.shape


def test_register_cli_sitreg_model_errors_name_the_file(tmp_path, capsys):
    from unireg.cli import main
    from unireg.methods.keymorph import KeyMorph
    from unireg.nets.keypoints import KeypointDetector

    _tiny_manifest(tmp_path)
    args = ["register", str(tmp_path / "s0.nii.gz"), str(tmp_path / "s1.nii.gz"), "-o",
            str(tmp_path / "out"), "--method", "sitreg", "--quiet", "--model"]  # fmt: skip
    assert main([*args, str(tmp_path / "none.pt")]) == 1
    err = capsys.readouterr().err
    assert "none.pt" in err and "no sitreg model" in err and "unireg train sitreg" in err
    detector = KeypointDetector(3, num_keypoints=4, channels=(4,))
    km = save_checkpoint(tmp_path / "km.pt", "keymorph", KeyMorph(detector, 40.0))
    assert main([*args, str(km)]) == 1
    assert "km.pt: a keymorph checkpoint, not a sitreg one" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "affine"), [("standard", "affine"), (None, "affine-gn")])
def test_the_shipped_sitreg_model_improves_on_its_affine_stage_on_the_demo_brains(variant, affine):
    # a sanity check of the shipped files (the demo subjects are IXI *training* subjects; the
    # accuracy on the test split is measured by bench/registration_benchmark.py)
    from unireg.methods import load_model, model_path
    from unireg.metrics import registration_metrics

    if not model_path("sitreg", variant).exists():
        pytest.skip("no SITReg model shipped in src/unireg/models/")
    model, payload = load_model("sitreg", variant)
    lite = variant is None  # the default is the lite model
    assert model.config["stem_stride"] == (2 if lite else 1)
    fixed, moving, fl, ml = demo_brains()
    res = register_sitreg(fixed, moving, model=model, checkpoint=payload, affine=affine)
    assert res.extras.inference == ("fast" if lite else "standard")
    full = registration_metrics(res, fixed_labels=fl, moving_labels=ml, hd95=False)
    linear = registration_metrics(transform=res.affine, fixed=fixed, fixed_labels=fl,
                                  moving_labels=ml, hd95=False)  # fmt: skip
    assert full["dice_mean"] > linear["dice_mean"] + 0.03
    assert full["folding_percent"] == 0.0
    # measured 0.03 mm (standard) and 0.16 mm (lite: both fields are exact inverses on the
    # 4 mm grid of its last update and upsampled separately), on 2 mm voxels
    assert full["inverse_consistency_mean_mm"] < (0.25 if lite else 0.1)


@pytest.mark.slow
def test_sitreg_registers_heads_in_any_orientation_with_either_linear_stage():
    # a head turned by 180 degrees: the default affine stage (affine-gn, started from the
    # principal axes' rotations too) and KeyMorph's keypoints both bring it within the
    # network's reach
    from importlib import resources

    from unireg.evaluation.harness import misalign, misalignment
    from unireg.methods import load_model, model_path
    from unireg.metrics import registration_metrics

    if not (model_path("sitreg").exists() and model_path("keymorph").exists()):
        pytest.skip("the SITReg and KeyMorph models are not shipped in src/unireg/models/")
    model, payload = load_model("sitreg")
    data = resources.files("unireg.demo_data")
    fixed = load_image(str(data / "IXI012-HH-1211-T1_ds.nii.gz"))
    fl = load_labels(str(data / "IXI012-HH-1211-T1_ds_DLMUSE.nii.gz"))
    moving = load_image(str(data / "IXI013-HH-1212-T1_ds.nii.gz"))
    ml = load_labels(str(data / "IXI013-HH-1212-T1_ds_DLMUSE.nii.gz"))
    matrix, _ = misalignment(moving.geometry, 180.0, axes=2, seed=1)
    moving, ml = misalign(moving, ml, matrix)
    dice = {}
    for stage in ("affine-gn", "keymorph"):
        res = register_sitreg(fixed, moving, model=model, checkpoint=payload, affine=stage)
        metrics = registration_metrics(res, fixed_labels=fl, moving_labels=ml, hd95=False)
        dice[stage] = metrics["dice_mean"]
        assert metrics["folding_percent"] == 0.0
    # measured 0.599 with either stage (0.599 at 0 degrees; 0.010 for affine-gn from the
    # centres of mass alone)
    assert dice["affine-gn"] > 0.5 and dice["keymorph"] > 0.5, dice


def test_sitreg_in_the_evaluation_harness(tmp_path):
    from unireg.errors import UniregError
    from unireg.evaluation import make_method

    _tiny_manifest(tmp_path)
    ckpt = save_checkpoint(tmp_path / "m.pt", "sitreg", _model(), preprocessing=PREP)
    method = make_method(f"sitreg:complete:affine=none:model={ckpt}")
    fixed, moving = load_image(tmp_path / "s0.nii.gz"), load_image(tmp_path / "s1.nii.gz")
    res = method.register(fixed, moving)
    assert res.inverse is not None and "complete" in res.extras.method
    assert np.allclose(res.extras.matrix, np.eye(4))  # no affine stage
    fast = make_method(f"sitreg:fast:affine=none:model={ckpt}").register(fixed, moving)
    assert "fast" in fast.extras.method and fast.inverse is not None
    # a model trained with "fast" runs "fast" unless told otherwise; the Gauss-Newton affine
    # stage is composed into the written transform like any other
    torch.manual_seed(4)
    lite = SITReg(3, channels=(4, 8, 8), hidden=8, tol=1e-4, stem_stride=2)
    lite_ckpt = save_checkpoint(tmp_path / "lite.pt", "sitreg", lite, preprocessing=PREP,
                                train_config={"inference": "fast"})  # fmt: skip
    res = make_method(f"sitreg:affine=affine-gn:model={lite_ckpt}").register(fixed, moving)
    assert res.extras.inference == "fast" and "affine-gn" in res.extras.method
    # (as SITReg's stage, affine-gn stops its finest level after 3 iterations, not 5)
    from unireg.methods.sitreg import STAGE_GN_LEVELS
    from unireg.solvers.gauss_newton import GN_LEVELS, affine_gauss_newton

    gn, trace = affine_gauss_newton(fixed, moving, levels=STAGE_GN_LEVELS["fast"])
    assert np.allclose(res.extras.matrix, gn.matrix.numpy(), atol=1e-6)
    assert STAGE_GN_LEVELS["fast"][-1][1] == 3 and GN_LEVELS["fast"][-1][1] == 5
    # on this small image the levels are fitted to its size (fit_levels): the finest level
    # left runs the iterations the stage gives it
    from unireg.solvers.solver import fit_levels

    finest = fit_levels(STAGE_GN_LEVELS["fast"], fixed.shape)[-1]
    assert trace[-1][0] == finest.factor
    assert sum(1 for f, _, _ in trace if f == finest.factor) == finest.iterations
    assert make_method(f"sitreg:model={ckpt}").register(fixed, moving).extras.inference == (
        "standard"
    )
    # the shipped default is the lite model after affine-gn; "standard" names the other one
    default = make_method("sitreg")
    assert default.method.model.config["stem_stride"] == 2
    assert default.method.options.affine == "affine-gn"
    standard = make_method("sitreg:affine=affine:model=standard")
    assert standard.method.model.config["stem_stride"] == 1
    for bad in ("sitreg:quick", f"sitreg:affine=similarity:model={ckpt}",
                f"sitreg:model={ckpt}:tol=1"):  # fmt: skip
        with pytest.raises(UniregError):
            make_method(bad)


def test_the_affine_gn_stage_hands_two_contrasts_to_mutual_information():
    """The learned methods' ``affine-gn`` stage keeps Gauss-Newton's result for one contrast
    and, when the pair it aligned does not look like one contrast (the solvers' correlation
    test), returns the solver's MI affine instead."""
    from unireg.methods.stages import affine_stage
    from unireg.solvers import register
    from unireg.solvers.gauss_newton import GN_LEVELS, affine_gauss_newton

    fixed, moving, _, _ = demo_brains()
    cpu = torch.device("cpu")
    same = affine_stage(fixed, moving, "affine-gn", "fast", cpu)
    gn, _ = affine_gauss_newton(fixed, moving, levels=GN_LEVELS["fast"], device=cpu)
    assert np.allclose(same.matrix.numpy(), gn.matrix.numpy())
    head = moving.data > moving.data.min()
    inverted = moving.with_data(torch.where(head, moving.data.max() - moving.data, 0.0))
    two = affine_stage(fixed, inverted, "affine-gn", "fast", cpu)
    mi = register(fixed, inverted, "affine", multimodal=True).transform
    assert np.allclose(two.matrix.numpy(), mi.matrix.numpy())
    assert not np.allclose(two.matrix.numpy(), gn.matrix.numpy(), atol=1e-3)
