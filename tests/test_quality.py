"""Never silently worse than doing nothing: the quality check flags a result that aligns the
images worse than no registration and passes a good one; ``--fallback solver`` replaces a
flagged learned result by the solver's; solver stages that end worse than they started keep
their start."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import oblique_affine, smooth_image

from unireg.cli import main
from unireg.evaluation import make_method
from unireg.io.image import Image
from unireg.quality import quality_check
from unireg.result import RegistrationResult
from unireg.solvers.solver import Level, Stage, solve
from unireg.spatial.geometry import linear_about, rotation_about_axes
from unireg.spatial.transform import AffineTransform, CompositeTransform

SHAPE = (32, 36, 30)


def _head(seed: int, affine: np.ndarray) -> Image:
    axes = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    vol = smooth_image(SHAPE, seed=seed)[0, 0].numpy() * np.exp(-sum(a**4 for a in axes) / 0.3)
    return Image(torch.from_numpy(vol.astype(np.float32))[None], affine)


@pytest.fixture(scope="module")
def pair():
    fixed = _head(4, oblique_affine((2.0, 2.0, 2.0), (0, 0, 0), (-32, -36, -30)))
    moving = _head(4, oblique_affine((2.0, 2.0, 2.0), (3, -2, 2), (-31, -36, -30)))
    return fixed, moving


def _result(transform, fixed, moving) -> RegistrationResult:
    return RegistrationResult(transform=transform, fixed=fixed.geometry, moving=moving.geometry)


def test_a_good_registration_passes_and_a_registration_to_the_wrong_image_is_flagged(pair):
    fixed, moving = pair
    good = make_method("unireg:rigid").register(fixed, moving, seed=0)
    checked = quality_check(good, fixed, moving)
    assert checked["quality_warning"] is None
    assert checked["quality_mi_result"] > checked["quality_mi_identity"]
    # a registration to the wrong image: the right answer for a copy of the moving image
    # turned by 60 degrees (the good map, then the turn), used for the real moving image
    turn = linear_about(rotation_about_axes(60.0, [0], 3), moving.geometry.center_world)
    wrong = CompositeTransform([good.transform, AffineTransform(turn)])
    flagged = quality_check(_result(wrong, fixed, moving), fixed, moving)
    assert (
        flagged["quality_warning"] is not None
        and "worse than no registration" in (flagged["quality_warning"])
    )


def test_a_deformable_result_worse_than_its_own_linear_stage_is_flagged(pair):
    from unireg.spatial.transform import DisplacementFieldTransform

    fixed, moving = pair
    linear = make_method("unireg:rigid").register(fixed, moving, seed=0).transform
    g = torch.Generator().manual_seed(0)
    noise = torch.randn((3, *[n // 4 for n in SHAPE]), generator=g)
    field = torch.nn.functional.interpolate(noise[None], size=SHAPE, mode="trilinear")[0] * 3.0
    scrambled = CompositeTransform([DisplacementFieldTransform(field, fixed.geometry), linear])

    class Deformed(RegistrationResult):
        @property
        def affine(self):
            return linear

    checked = quality_check(
        Deformed(transform=scrambled, fixed=fixed.geometry, moving=moving.geometry), fixed, moving
    )
    assert "its own linear stage" in (checked["quality_warning"] or "")


def test_a_deformable_result_that_folds_past_the_limit_is_flagged(pair):
    from unireg.quality import FOLDING_LIMIT
    from unireg.spatial.transform import DisplacementFieldTransform

    fixed, moving = pair
    good = make_method("unireg:rigid").register(fixed, moving, seed=0)

    def on_good(amplitude: float) -> dict:
        # the good map after a square wave of +-amplitude mm along the first voxel axis
        # (period 4 voxels): its central differences, -+amplitude per 2 mm voxel, fold half
        # of the grid once amplitude exceeds the 2 mm spacing
        wave = torch.tensor([1.0, 1.0, -1.0, -1.0]).repeat(SHAPE[0] // 4 + 1)[: SHAPE[0]]
        axis = torch.as_tensor(fixed.affine[:3, 0], dtype=torch.float32)
        axis = axis / axis.norm()
        field = amplitude * axis[:, None, None, None] * wave[None, :, None, None]
        field = field.expand(3, *SHAPE).contiguous()
        warp = DisplacementFieldTransform(field, fixed.geometry)
        result = _result(CompositeTransform([warp, good.transform]), fixed, moving)
        return quality_check(result, fixed, moving)

    folded, smooth = on_good(2.5), on_good(0.5)
    assert folded["quality_folding_percent"] > FOLDING_LIMIT
    # it still aligns the images better than no registration: the folding check alone flags it
    assert folded["quality_mi_result"] > folded["quality_mi_identity"]
    assert "folds" in (folded["quality_warning"] or "")
    assert smooth["quality_folding_percent"] == 0 and smooth["quality_warning"] is None
    linear = quality_check(good, fixed, moving)
    assert linear["quality_folding_percent"] is None and linear["quality_warning"] is None


def _save(image: Image, path):
    nib.save(nib.Nifti1Image(image.data[0].numpy(), image.affine), str(path))
    return path


def test_fallback_solver_replaces_a_flagged_learned_result(pair, tmp_path, monkeypatch, capsys):
    import unireg.methods

    fixed, moving = pair
    f, m = _save(fixed, tmp_path / "f.nii.gz"), _save(moving, tmp_path / "m.nii.gz")
    real_create = unireg.methods.create

    def create(entry, options=None, device="cpu"):
        method = real_create(entry, options, device)
        if entry.name != "keymorph":
            return method
        turn = AffineTransform(linear_about(rotation_about_axes(70.0, [0], 3),
                                            fixed.geometry.center_world))  # fmt: skip

        class Broken:  # a learned method that returns a wrong map
            def register(self, fixed, moving, **kwargs):
                return RegistrationResult(transform=turn, fixed=fixed.geometry,
                                          moving=moving.geometry, elapsed=0.0)  # fmt: skip

        return Broken()

    monkeypatch.setattr(unireg.methods, "create", create)
    out = tmp_path / "out"
    assert main(["register", str(f), str(m), "-o", str(out), "--method", "keymorph", "-q"]) == 0
    warned = json.loads((out / "metrics.json").read_text())
    assert warned["quality_warning"] and warned["fallback"] is None  # warned, kept
    assert "stages_kept_start" not in warned  # a solver's field
    assert "warning" in capsys.readouterr().err
    args = ["register", str(f), str(m), "-o", str(out), "--method", "keymorph", "-q",
            "--fallback", "solver"]  # fmt: skip
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fallback"]["from"].startswith("keymorph")
    assert metrics["fallback"]["to"] == "affine"
    assert metrics["method"] == "affine" and metrics["quality_warning"] is None
    assert isinstance(metrics["stages_kept_start"], list) and metrics["contrast_r"] is None
    direct = tmp_path / "direct"
    assert main(["register", str(f), str(m), "-o", str(direct), "--method", "affine", "-q"]) == 0
    for name in ("warped.nii.gz", "affine.mat"):
        a = nib.load(str(out / name)) if name.endswith(".gz") else None
        if a is not None:
            b = nib.load(str(direct / name))
            assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
        else:
            assert (out / name).read_bytes() == (direct / name).read_bytes()


@pytest.mark.parametrize("model", ["rigid", "greedy"])
def test_a_solver_stage_that_ends_worse_than_it_started_keeps_its_start(model):
    image = smooth_image((24, 26, 22), seed=7).float()  # identical images: the start is optimal
    stage = Stage(model=model, levels=[Level(1, 12)], loss="mse", lr=0.8 if model == "rigid"
                  else 3.0, lr_final=1.0, tolerance=0.0)  # fmt: skip
    out = solve(image, image, [stage])
    assert out.trace[-1].get("kept_start") is True
    assert out.trace[-1]["stage_start"] < out.trace[-1]["stage_end"]
    assert np.array_equal(out.matrix, np.eye(4))
    if model == "greedy":
        assert float(out.displacement.abs().max()) == 0.0


def test_syn_between_two_contrasts_keeps_its_linear_result_and_says_so(pair, tmp_path, capsys):
    fixed, moving = pair
    x = moving.data
    brain = (x > 0.2 * x.max()).float()
    extracted = fixed.with_data(fixed.data * (fixed.data > 0.2 * fixed.data.max()))
    inverted = moving.with_data((x.max() - x) * brain)  # dark <-> bright inside the head
    f = _save(extracted, tmp_path / "f.nii.gz")
    m = _save(inverted, tmp_path / "m.nii.gz")
    out = tmp_path / "out"
    assert main(["register", str(f), str(m), "-o", str(out), "--method", "syn", "-q"]) == 0
    err = capsys.readouterr().err
    assert "note: syn" in err and "do not look like one contrast" in err  # even with -q
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stages_kept_start"] == ["greedy"] and metrics["contrast_r"] < 0.62
    assert metrics["folding_percent"] == 0.0 and metrics["jacobian_std"] < 1e-6  # linear


def test_a_solver_whose_linear_result_is_worse_than_the_headers_keeps_the_identity(
    pair, tmp_path, capsys, monkeypatch
):
    import unireg.solvers.api as api

    fixed, moving = pair
    good = api.register(fixed, moving, "affine")  # the real linear stages: kept
    assert not good.extras.kept_identity()
    entry = next(e for e in good.extras.trace if "mi_identity" in e)
    assert entry["mi_linear"] > entry["mi_identity"]
    # linear stages that end 60 degrees off, on a pair the headers already align
    turn = linear_about(rotation_about_axes(60.0, [0], 3), fixed.geometry.center_world)
    real_solve = api.solve

    def turned(*args, **kwargs):
        out = real_solve(*args, **kwargs)
        out.matrix = turn @ out.matrix
        return out

    monkeypatch.setattr(api, "solve", turned)
    lines: list[str] = []
    kept = api.register(fixed, fixed, "affine", progress=lines.append)
    assert kept.extras.kept_identity()
    assert np.array_equal(kept.transform.matrix, np.eye(4))
    entry = next(e for e in kept.extras.trace if e.get("kept_identity"))
    assert entry["mi_linear"] < (1.0 - api.IDENTITY_MARGIN) * entry["mi_identity"]
    assert any("worse than their headers" in line for line in lines)
    f = _save(fixed, tmp_path / "f.nii.gz")
    out = tmp_path / "out"
    assert main(["register", str(f), str(f), "-o", str(out), "--method", "affine", "-q"]) == 0
    assert "worse than their headers" in capsys.readouterr().err  # even with -q
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kept_identity"] is True and metrics["quality_warning"] is None


def test_foreground_overlaps_match_a_hand_computed_case():
    """``foreground_overlaps``: two boxes of 4 x 4 x 4 and 4 x 4 x 2 voxels (1 mm) sharing
    4 x 4 x 2: Dice 2 * 32 / (64 + 32); the second seen 3 voxels higher, half inside the first:
    2 * 16 / 96; moved beyond it, 0; an empty moving image, 0."""
    from unireg.quality import foreground_overlaps

    a, b = torch.zeros(1, 10, 10, 10), torch.zeros(1, 10, 10, 10)
    a[0, 2:6, 2:6, 2:6] = 1.0
    b[0, 2:6, 2:6, 2:4] = 1.0
    shift = np.eye(4)
    shift[2, 3] = -3.0  # fixed point z -> moving point z - 3: the box seen at z 5-6
    moved = np.eye(4)
    moved[2, 3] = 4.0  # seen at z -2..-1: outside the first box
    fixed, moving = Image(a, np.eye(4)), Image(b, np.eye(4))
    got = foreground_overlaps(
        fixed, moving, {"id": None, "shift": AffineTransform(shift), "off": AffineTransform(moved)}
    )
    assert got["id"] == pytest.approx(2 * 32 / 96)
    assert got["shift"] == pytest.approx(2 * 16 / 96)
    assert got["off"] == 0.0
    empty = Image(torch.zeros(1, 10, 10, 10), np.eye(4))
    assert foreground_overlaps(fixed, empty, {"id": None})["id"] == 0.0


def test_foreground_overlaps_over_every_other_voxel_are_those_of_the_grid_subsampled():
    """``step=2``: the same Dice as the fixed foreground and the resampled moving image's
    taken at every other voxel of the full grid (odd sizes, an oblique grid, a turn)."""
    from unireg.io.image import normalize_intensity, resample
    from unireg.quality import FOREGROUND, foreground_overlaps

    fixed = Image(
        smooth_image((17, 14, 11), seed=1)[0].float(),
        oblique_affine((1.5, 2.0, 1.0), (10, 0, 5), (3, -4, 2)),
    )
    moving = Image(smooth_image((15, 16, 12), seed=2)[0].float(), np.diag([1.6, 1.4, 1.8, 1.0]))
    turn = AffineTransform(
        linear_about(rotation_about_axes(20.0, [0, 2], 3), fixed.geometry.center_world)
    )
    got = foreground_overlaps(fixed, moving, {"turn": turn}, step=2)["turn"]
    f = normalize_intensity(fixed).data[0, ::2, ::2, ::2] > FOREGROUND
    w = (
        resample(normalize_intensity(moving), fixed.geometry, turn).data[0, ::2, ::2, ::2]
        > FOREGROUND
    )
    assert 0.1 < got < 0.99
    assert got == pytest.approx(2 * float((f & w).sum()) / float(f.sum() + w.sum()), abs=1e-6)
