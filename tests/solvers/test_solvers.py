"""Training-free solvers: each transform model recovers a known transform; diffeomorphic models
do not fold; prompts help where intensity cannot; seeds repeat."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import oblique_affine, smooth_field, smooth_image

from unireg.io.image import Image
from unireg.metrics import dice
from unireg.solvers import (
    LabelPrompt,
    LandmarkPrompt,
    Level,
    Stage,
    preset_stages,
    register,
    rotation_grid,
    solve,
)
from unireg.spatial import (
    AffineTransform,
    Geometry,
    compose_displacements,
    jacobian_determinant,
    warp,
)
from unireg.spatial.bspline import bspline_field, control_grid_shape
from unireg.spatial.filters import gaussian_blur


def _rigid_world(angles_deg, translation) -> np.ndarray:
    d = len(translation)
    m = np.eye(d + 1)
    if d == 2:
        a = math.radians(angles_deg[0])
        m[:2, :2] = [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]
    else:
        m[:3, :3] = oblique_affine((1, 1, 1), angles_deg, (0, 0, 0))[:3, :3]
    m[:d, d] = translation
    return m


def _about_centre(matrix: np.ndarray, geom: Geometry) -> np.ndarray:
    """``matrix`` as a map about the grid centre (so rotations stay inside the image)."""
    d = geom.ndim
    c = geom.center_world
    shift, back = np.eye(d + 1), np.eye(d + 1)
    shift[:d, d], back[:d, d] = -c, c
    return back @ matrix @ shift


def _moving_of(fixed: Image, world: np.ndarray, geom: Geometry | None = None) -> Image:
    """The moving image whose registration onto ``fixed`` is the world map ``world``."""
    geom = geom or fixed.geometry
    inv = AffineTransform(np.linalg.inv(world))
    data = inv.warp(fixed.batch(), fixed.geometry, geom)
    return Image(data[0], geom.affine)


def _image(shape, spacing=None, seed=0) -> Image:
    d = len(shape)
    aff = np.eye(d + 1)
    if spacing is not None:
        aff[:d, :d] = np.diag(spacing)
    # vanish towards the border (as a head in its field of view), so nothing leaves the grid
    axes = torch.meshgrid(*[torch.linspace(-1, 1, n, dtype=torch.float64) for n in shape],
                          indexing="ij")  # fmt: skip
    envelope = torch.exp(-sum(a**4 for a in axes) / 0.15)
    return Image((smooth_image(shape, seed=seed)[0] * envelope).float(), aff)


# -- B-spline grids ---------------------------------------------------------------------------


def test_bspline_reproduces_linear_fields_at_any_resolution():
    m = control_grid_shape((33, 41), 4)
    assert m == (11, 13)
    # control values equal to their normalised positions -> the field is exactly the position
    pos = [-1 + (torch.arange(k, dtype=torch.float64) - 1) * 2 / (k - 3) for k in m]
    ctrl = torch.stack(torch.meshgrid(*pos, indexing="ij"))[None]
    for shape in [(33, 41), (17, 21), (50, 7)]:
        field = bspline_field(ctrl, shape)
        axes = torch.meshgrid(*[torch.linspace(-1, 1, n, dtype=torch.float64) for n in shape],
                              indexing="ij")  # fmt: skip
        assert torch.allclose(field[0], torch.stack(axes), atol=1e-12)
    ones = bspline_field(torch.ones(1, 1, 6, 7, 8, dtype=torch.float64), (20, 9, 31))
    assert torch.allclose(ones, torch.ones_like(ones), atol=1e-12)  # partition of unity


def test_rotation_grid_is_a_set_of_distinct_rotations():
    r = rotation_grid(3, 90.0)
    assert r.shape == (24, 3, 3)  # the rotation group of the cube
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(r @ r.transpose(1, 2), eye.expand(24, 3, 3), atol=1e-12)
    assert torch.allclose(torch.linalg.det(r), torch.ones(24, dtype=torch.float64))
    assert torch.allclose(r[0], eye)


# -- linear models -----------------------------------------------------------------------------


def test_rigid_2d_recovers_a_known_rotation_on_anisotropic_pixels():
    fixed = _image((64, 48), spacing=(1.0, 1.5))
    truth = _about_centre(_rigid_world([12.0], [3.0, -4.0]), fixed.geometry)
    moving = _moving_of(fixed, truth)
    stages = [Stage("rigid", [Level(2, 150), Level(1, 100)], loss="mse", lr=0.02, tolerance=0)]
    out = solve(fixed.batch(), moving.batch(), stages,
                fixed_geometry=fixed.geometry, moving_geometry=moving.geometry)  # fmt: skip
    lin = out.matrix[:2, :2]
    assert np.allclose(lin @ lin.T, np.eye(2), atol=1e-10)  # rigid in world mm
    angle = math.degrees(math.atan2(lin[1, 0], lin[0, 0]))
    assert abs(angle - 12.0) < 0.2
    c = fixed.geometry.center_world
    assert np.abs(out.matrix[:2] @ np.r_[c, 1] - truth[:2] @ np.r_[c, 1]).max() < 0.1  # mm


def test_affine_3d_recovers_a_known_affine_across_grids():
    fixed = _image((32, 28, 24), spacing=(1.0, 1.2, 1.5))
    truth = np.eye(4)
    truth[:3, :3] = [[1.08, 0.05, 0.0], [-0.04, 0.95, 0.03], [0.02, 0.0, 1.04]]
    truth[:3, 3] = [1.5, -1.0, 2.0]
    truth = _about_centre(truth, fixed.geometry)
    mgeom = Geometry((30, 30, 26), oblique_affine((1.1, 1.1, 1.3), (5, -3, 4), (-2, 1, 3)))
    mgeom = Geometry(mgeom.shape, mgeom.affine)
    moving = _moving_of(fixed, truth, mgeom)
    stages = [Stage("affine", [Level(2, 200), Level(1, 150)], loss="mse", lr=0.01, tolerance=0)]
    out = solve(fixed.batch(), moving.batch(), stages,
                fixed_geometry=fixed.geometry, moving_geometry=mgeom)  # fmt: skip
    # the recovered map agrees with the truth at the corners of the central half of the fixed
    # grid within half the smallest voxel (the images are resampled copies, so not exact)
    corners = np.array([[i, j, k, 1] for i in (8, 23) for j in (7, 20) for k in (6, 17)], float)
    world = corners @ fixed.geometry.voxel_to_world.T
    err = np.linalg.norm(world @ out.matrix.T - world @ truth.T, axis=1)
    assert err.max() < 0.5, err


def test_rotation_search_recovers_an_upside_down_brain_like_volume():
    fixed = _image((32, 32, 32), spacing=(2.0, 2.0, 2.0), seed=3)
    truth = _about_centre(_rigid_world([170.0, 0.0, 20.0], [2.0, 0.0, -3.0]), fixed.geometry)
    moving = _moving_of(fixed, truth)
    stages = [Stage("rigid", [Level(2, 100), Level(1, 50)], loss="ncc", lr=0.02,
                    init="search", search_step=90.0, search_top=3)]  # fmt: skip
    out = solve(fixed.batch(), moving.batch(), stages,
                fixed_geometry=fixed.geometry, moving_geometry=moving.geometry)  # fmt: skip
    rel = out.matrix[:3, :3] @ truth[:3, :3].T
    angle = math.degrees(math.acos(min(1.0, (np.trace(rel) - 1) / 2)))
    assert angle < 2.0
    local = stages[0].__class__("rigid", [Level(2, 100), Level(1, 50)], loss="ncc", lr=0.02)
    plain = solve(fixed.batch(), moving.batch(), [local],
                  fixed_geometry=fixed.geometry, moving_geometry=moving.geometry)  # fmt: skip
    rel = plain.matrix[:3, :3] @ truth[:3, :3].T
    assert math.degrees(math.acos(min(1.0, (np.trace(rel) - 1) / 2))) > 30  # search needed


def test_landmark_prompt_alone_determines_the_affine():
    geom = Geometry((24, 24, 24), np.diag([1.5, 1.5, 1.5, 1.0]))
    blank = torch.zeros(1, 1, 24, 24, 24)
    truth = np.eye(4)
    truth[:3, :3] = [[1.05, 0.02, 0.0], [0.0, 0.97, 0.04], [-0.03, 0.0, 1.02]]
    truth[:3, 3] = [2.0, -3.0, 1.0]
    rng = np.random.default_rng(0)
    xf = rng.uniform(0, 34, size=(12, 3))
    xm = xf @ truth[:3, :3].T + truth[:3, 3]
    stages = [Stage("affine", [Level(1, 300)], loss="mse", lr=0.02, tolerance=0)]
    out = solve(blank, blank, stages, fixed_geometry=geom, moving_geometry=geom,
                prompts=[LandmarkPrompt(xf, xm, weight=1.0)])  # fmt: skip
    mapped = xf @ out.matrix[:3, :3].T + out.matrix[:3, 3]
    assert np.linalg.norm(mapped - xm, axis=1).max() < 0.05  # mm


# -- dense models -----------------------------------------------------------------------------


def _texture(shape, seed=0) -> torch.Tensor:
    """Blurred noise in [0, 1] ``(1, 1, *shape)``: structure everywhere, so a dense
    deformation is identifiable at every voxel."""
    g = torch.Generator().manual_seed(seed)
    x = gaussian_blur(torch.rand(1, 1, *shape, generator=g), 2.0)
    return (x - x.min()) / (x.max() - x.min())


def test_free_form_pair_is_the_warp_of_its_displacement_with_the_same_gradient():
    # the free-form model builds its sampling points from the voxel field directly; the
    # compared images and the field's gradient are those of warping by displacement()
    from unireg.solvers.dense import DenseModel, FreeFormModel

    moving = _texture((12, 10, 9)).double()
    model = FreeFormModel(3)
    model.set_level((12, 10, 9), moving)
    with torch.no_grad():
        model.field.copy_(smooth_field((12, 10, 9), 0.15, seed=3) * 4)
    results = []
    for pair in (FreeFormModel.pair, DenseModel.pair):
        model.field.grad = None
        _, warped = pair(model, moving, moving)
        warped.square().sum().backward()
        results.append((warped.detach(), model.field.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    assert float(results[0][1].abs().max()) > 0


@pytest.mark.parametrize("model", ["ffd", "greedy", "svf", "bspline"])
def test_dense_models_recover_a_known_deformation(model):
    # the fixed image is the moving one pulled back through the truth, so the sought map is
    # exactly x -> x + u(x)
    shape = (64, 64)
    image = _texture(shape)
    truth = smooth_field(shape, 0.08, seed=2).float()  # up to 2.5 voxels
    fixed = warp(image, truth, padding="border")  # fixed(x) = image(x + u(x)) -> T = id + u
    stage = Stage(model, [Level(2, 150), Level(1, 150)], loss="mse", lr=0.1,
                  smooth_gradient=1.0, smooth_field=1.0 if model == "greedy" else 0.0,
                  control_spacing=4.0, tolerance=0)  # fmt: skip
    out = solve(fixed, image, [stage])
    err = (out.displacement - truth) * 31.5  # voxels
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    epe = err.norm(dim=1, keepdim=True)[inner]
    before = (truth * 31.5).norm(dim=1, keepdim=True)[inner]
    assert float(before.mean()) > 0.8
    assert float(epe.mean()) < 0.25, float(epe.mean())  # voxels


@pytest.mark.parametrize("foreground", [True, False])
def test_dense_stage_compares_over_the_foreground_mask_when_set(foreground):
    # with foreground set, the fixed image outside the foreground mask does not enter the
    # objective: noise there leaves the dense result as it was; over the whole grid it does not
    shape = (48, 48)
    image = _texture(shape, seed=3)
    fixed = warp(image, smooth_field(shape, 0.05, seed=3).float(), padding="border")
    inside = torch.zeros(1, 1, *shape, dtype=torch.bool)
    inside[..., 10:38, 10:38] = True
    noisy = torch.where(
        inside, fixed, torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(5))
    )
    stage = Stage("ffd", [Level(1, 40)], loss="mse", lr=0.1, tolerance=0, foreground=foreground)
    clean = solve(fixed, image, [stage], foreground_mask=inside).displacement
    changed = solve(noisy, image, [stage], foreground_mask=inside).displacement
    assert float(clean.abs().max()) > 1e-3  # it deformed
    assert torch.allclose(clean, changed, atol=1e-6) == foreground


@pytest.mark.parametrize("model", ["greedy", "bspline", "greedy-sgd"])
def test_dense_models_recover_a_known_deformation_in_3d(model):
    optimizer = "sgd" if model.endswith("sgd") else "adam"
    model = model.split("-")[0]
    shape = (24, 24, 24)
    image = _texture(shape, seed=4)
    truth = smooth_field(shape, 0.25, seed=4).float()  # up to 2.9 voxels
    fixed = warp(image, truth, padding="border")
    lr = 2.0 if optimizer == "sgd" else 0.2  # sgd: the largest step of a level, in voxels
    stage = Stage(model, [Level(2, 80), Level(1, 60)], loss="mse", lr=lr, tolerance=0,
                  smooth_gradient=1.0, smooth_field=0.5 if model == "greedy" else 0.0,
                  optimizer=optimizer)  # fmt: skip
    out = solve(fixed, image, [stage])
    inner = (slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    epe = ((out.displacement - truth) * 11.5).norm(dim=1)[inner]
    before = (truth * 11.5).norm(dim=1)[inner]
    assert float(before.mean()) > 0.5
    # measured: greedy 0.15, bspline 0.09, greedy with SyN-style normalised SGD steps 0.28
    # voxel (slower where gradients are weak), from 0.70
    bound = 0.35 if optimizer == "sgd" else 0.25
    assert float(epe.mean()) < bound, (float(epe.mean()), float(before.mean()))


@pytest.mark.parametrize("model", ["greedy", "svf"])
def test_diffeomorphic_models_do_not_fold_on_a_large_deformation(model):
    shape = (64, 64)
    image = _texture(shape, seed=5)
    # a swirl: rotation by up to 70 degrees about the centre, fading out
    y, x = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    r = (x**2 + y**2).sqrt()
    theta = math.radians(70) * torch.exp(-((r / 0.6) ** 2))
    py = y * torch.cos(theta) - x * torch.sin(theta)
    px = y * torch.sin(theta) + x * torch.cos(theta)
    swirl = torch.stack([py - y, px - x])[None]
    assert float(swirl.norm(dim=1).max()) * 31.5 > 8  # more than 8 voxels
    fixed = warp(image, swirl, padding="border")
    svf = model == "svf"  # the SVF with a light diffusion term, as its presets use it
    stage = Stage(model, [Level(4, 200), Level(2, 200), Level(1, 100)], loss="mse",
                  lr=0.25 if svf else 0.5, smooth_gradient=1.0, smooth_field=0.0 if svf else 1.0,
                  regularizer="diffusion" if svf else None, regularizer_weight=0.01,
                  tolerance=0)  # fmt: skip
    out = solve(fixed, image, [stage])
    det = jacobian_determinant(out.displacement)
    assert float(det.min()) > 0
    moved = warp(image, out.displacement, padding="border")
    before = float(((image - fixed) ** 2).mean())
    assert float(((moved - fixed) ** 2).mean()) < 0.1 * before
    if model == "svf":
        ident = compose_displacements(out.inverse_displacement, out.displacement)
        err = ident.norm(dim=1)[:, 4:-4, 4:-4] * 31.5  # voxels, away from the border
        # inverse by construction, up to scaling-and-squaring discretisation (measured: mean
        # 0.05, max 0.2 voxel for this ~10-voxel swirl)
        assert float(err.mean()) < 0.1 and float(err.max()) < 0.5


def test_label_prompt_resolves_what_intensity_cannot():
    # a uniform disc: every rotation about its centre fits the intensities equally well; its
    # label halves are rotated by 35 degrees in the moving image
    n = 48
    geom = Geometry((n, n), np.eye(3))
    y, x = torch.meshgrid(torch.arange(n) - 23.5, torch.arange(n) - 23.5, indexing="ij")
    disc = ((x**2 + y**2) < 18**2).float()[None, None]
    labels_f = torch.where(disc[0, 0] > 0, torch.where(x > 0, 1, 2), 0)[None, None]
    a = math.radians(35)
    xr = math.cos(a) * x - math.sin(a) * y
    labels_m = torch.where(disc[0, 0] > 0, torch.where(xr > 0, 1, 2), 0)[None, None]
    stages = [Stage("rigid", [Level(2, 100), Level(1, 100)], loss="mse", lr=0.02, tolerance=0)]
    plain = solve(disc, disc, stages, fixed_geometry=geom, moving_geometry=geom)
    prompted = solve(disc, disc, stages, fixed_geometry=geom, moving_geometry=geom,
                     prompts=[LabelPrompt(labels_f, labels_m, weight=1.0)])  # fmt: skip

    def score(matrix):
        warped = AffineTransform(matrix).warp_labels(labels_m, geom, geom)
        return float(np.mean(list(dice(labels_f[0, 0].numpy(), warped[0, 0].numpy()).values())))

    assert score(plain.matrix) < 0.85
    assert score(prompted.matrix) > 0.95
    assert score(prompted.matrix) > score(plain.matrix) + 0.1


# -- image-level API ---------------------------------------------------------------------------


@pytest.mark.slow
def test_register_is_repeatable_with_a_seed_and_reports_its_trace():
    fixed = _image((24, 24, 20), spacing=(2.0, 2.0, 2.0), seed=7)
    truth = _about_centre(_rigid_world([5.0, 3.0, -4.0], [2.0, 1.0, 0.0]), fixed.geometry)
    moving = _moving_of(fixed, truth)
    kw = {"preset": "fast", "seed": 3, "deformable": "svf"}
    a = register(fixed, moving, "syn", **kw)
    b = register(fixed, moving, "syn", **kw)
    assert np.array_equal(a.extras.matrix, b.extras.matrix)
    assert torch.equal(
        a.transform.displacement(fixed.geometry), b.transform.displacement(fixed.geometry)
    )
    assert [t["model"] for t in a.extras.trace][:1] == ["rigid"]
    assert a.inverse is not None and a.elapsed > 0
    # the symmetric SVF's inverse undoes the forward map (world mm)
    x = torch.tensor([[24.0, 20.0, 18.0], [10.0, 30.0, 20.0]], dtype=torch.float64)
    back = a.inverse.map_points(a.transform.map_points(x))
    assert float((back - x).abs().max()) < 0.2


def test_rigid_refines_at_the_finer_levels_of_affine():
    # `rigid` on its own is refined at affine's finer levels (MI 1/4, LNCC 1/2), not left at
    # its 1/8 start: measured on a shipped brain, 0.17 mm mean error over the head (0.53 with
    # the 1/8 level alone)
    from importlib.resources import files

    from unireg.io import load_image
    from unireg.solvers.api import preset_stages

    stages = preset_stages("rigid", "fast", shape=(120, 120, 90))
    assert [(s.model, s.loss) for s in stages] == [("rigid", "mi"), ("rigid", "mi"),
                                                   ("rigid", "lncc")]  # fmt: skip
    fixed = load_image(files("unireg.demo_data") / "IXI012-HH-1211-T1_ds.nii.gz")
    geom = fixed.geometry
    truth = _about_centre(_rigid_world([8.0, -6.0, 5.0], [3.0, -2.0, 1.0]), geom)
    moving = _moving_of(fixed, truth)
    head = np.argwhere(fixed.data[0].numpy() > np.percentile(fixed.data[0].numpy(), 70))
    world = np.c_[head, np.ones(len(head))] @ geom.voxel_to_world.T
    out = register(fixed, moving, "rigid")
    err = np.linalg.norm(world @ out.extras.matrix.T - world @ truth.T, axis=1)
    assert err.mean() < 0.3 and err.max() < 0.6, (err.mean(), err.max())


def test_foreground_mask_of_a_zero_background():
    from unireg.solvers.api import foreground_mask

    x = torch.zeros(1, 12, 12, 12)
    x[0, 3:9, 3:9, 3:9] = 1.0
    image = Image(x, np.eye(4))
    assert int(foreground_mask(image, erode=0).sum()) == 6**3
    assert int(foreground_mask(image, erode=1).sum()) == 4**3
    assert bool(foreground_mask(image, erode=5).all())  # nothing left: every voxel
    noisy = Image(torch.rand(1, 8, 8, 8, generator=torch.Generator().manual_seed(0)), np.eye(4))
    assert int(foreground_mask(noisy, erode=0).sum()) == 8**3 - 1  # all but the minimum


def test_affine_on_a_brain_extracted_pair_near_the_identity_gains_on_it():
    # a shipped brain, brain-extracted by its labels, against itself deformed by 4-8 mm with no
    # rotation: the best linear map is about the identity. With the LNCC linear stage's
    # similarity over the fixed foreground, affine gains on the identity (measured: Dice 0.777
    # against 0.755; over the whole grid 0.757; on 7 IXI training subjects the whole grid ended
    # below the identity, 0.777 against 0.788, the LNCC windows along the cut edge pulling the
    # outlines together, and the foreground 0.807)
    from importlib.resources import files

    from unireg.evaluation import shifts
    from unireg.io import load_image, load_labels
    from unireg.metrics import registration_metrics

    demo = files("unireg.demo_data")
    image = load_image(demo / "IXI012-HH-1211-T1_ds.nii.gz")
    labels = load_labels(demo / "IXI012-HH-1211-T1_ds_DLMUSE.nii.gz")
    s = shifts.skullstrip(shifts.Shifted(image, image, labels, labels), 0)
    s = shifts.selfwarp(s, 0, angle=0.0)
    dice = {}
    for name, fg in (("masked", 0), ("whole", -1)):
        out = register(s.fixed, s.moving, "affine", foreground=fg)
        scores = registration_metrics(out, fixed_labels=s.fixed_labels,
                                      moving_labels=s.moving_labels, hd95=False)  # fmt: skip
        dice[name] = scores["dice_mean"]
    identity = registration_metrics(transform=AffineTransform(np.eye(4)), fixed=s.fixed,
                                    fixed_labels=s.fixed_labels, moving_labels=s.moving_labels,
                                    hd95=False)["dice_mean"]  # fmt: skip
    assert dice["masked"] > identity + 0.007, (dice, identity)
    assert dice["masked"] > dice["whole"] + 0.006, (dice, identity)


def test_mi_stages_see_the_outline_of_a_brain_extracted_pair_of_other_contrasts():
    # a shipped brain, brain-extracted, against itself turned by 15 degrees and deformed by 2-4
    # mm, the moving copy in a synthetic contrast: MI over the whole grid sees the brain's
    # outline against the dark background; over the fixed brain alone it sees only the random
    # contrast inside (measured end-point errors: 1.04 / 1.28 mm against 1.48 / 2.35 mm, no
    # registration 13 mm)
    import dataclasses
    from importlib.resources import files

    from unireg.evaluation import shifts
    from unireg.evaluation.harness import endpoint_error
    from unireg.io import load_image, load_labels

    demo = files("unireg.demo_data")
    image = load_image(demo / "IXI012-HH-1211-T1_ds.nii.gz")
    labels = load_labels(demo / "IXI012-HH-1211-T1_ds_DLMUSE.nii.gz")
    stripped = shifts.skullstrip(shifts.Shifted(image, image, labels, labels), 0)
    for seed in (0, 1):
        s = shifts.synth(shifts.selfwarp(stripped, seed, angle=15.0, max_mm=(2.0, 4.0)), seed)
        shipped = preset_stages("rigid", shape=s.fixed.shape)
        assert [st.foreground for st in shipped] == [False, False, True]  # MI, MI, LNCC
        masked = [dataclasses.replace(st, foreground=True) for st in shipped]
        err = {}
        for name, stages in (("shipped", shipped), ("masked", masked)):
            out = register(s.fixed, s.moving, "rigid", stages=stages)
            err[name] = endpoint_error(out.transform, s.truth, s.fixed, s.fixed_labels)
        assert err["shipped"] < 0.8 * err["masked"], (seed, err)


def test_a_dense_stage_that_aligns_worse_than_its_linear_start_keeps_the_start():
    # the judge of register's dense stage: mutual information against the linear stage alone
    from unireg.solvers.api import _judge_dense_stage, world_transforms
    from unireg.solvers.solver import SolveResult

    image = _image((24, 24, 24), spacing=(2.0, 2.0, 2.0), seed=4)  # fixed = moving: identity
    field = smooth_field((24, 24, 24), 1.0, seed=2).float()
    for name, scale in (("bad", 0.3), ("good", 1e-3)):
        out = SolveResult(np.eye(4), displacement=scale * field, trace=[{"model": "greedy"}],
                          levels=[(2.0, scale * field[..., ::2, ::2, ::2])])  # fmt: skip
        lines: list[str] = []
        forward, _ = world_transforms(out, image)
        kept = _judge_dense_stage(out, image, image, forward, lines.append)
        assert kept == (name == "bad")
        entry = out.trace[-1]
        assert out.displacement is not None
        if name == "bad":  # 30 % of the half-extent: far worse than the identity it started at
            assert entry["kept_start"] and entry["mi_result"] < entry["mi_linear"]
            assert float(out.displacement.abs().max()) == 0.0
            assert float(out.levels[0][1].abs().max()) == 0.0
            assert lines and "kept its start" in lines[0]
        else:
            assert "kept_start" not in entry and not lines
            assert torch.equal(out.displacement, scale * field)


def test_syn_keeps_its_linear_result_between_two_contrasts():
    from unireg.solvers.api import CONTRAST_R, contrast_correlation

    blobs = _image((32, 32, 32), spacing=(2.0, 2.0, 2.0), seed=5)
    fixed = blobs.with_data(blobs.data * (blobs.data > 0.2 * blobs.data.max()))  # extracted
    truth = _about_centre(_rigid_world([4.0, -3.0, 2.0], [2.0, -1.0, 1.0]), fixed.geometry)
    moving = _moving_of(fixed, truth)
    x = moving.data
    inverted = moving.with_data((x.max() - x) * (x > 0.05 * x.max()))  # dark <-> bright
    assert contrast_correlation(fixed, moving, truth) > 0.95
    assert contrast_correlation(fixed, inverted, truth) < 0.0
    lines: list[str] = []
    same = register(fixed, moving, "syn")
    other = register(fixed, inverted, "syn", progress=lines.append)
    assert not isinstance(same.transform, AffineTransform)  # the deformable stage ran
    assert same.extras.trace[-1]["contrast_r"] >= CONTRAST_R
    assert isinstance(other.transform, AffineTransform)  # the linear result, said so
    last = other.extras.trace[-1]
    assert last["kept_start"] and last["iterations"] == 0 and last["contrast_r"] < CONTRAST_R
    assert any("skipped" in line and "one contrast" in line for line in lines)
    # a named method only: given stages run as given
    stages = preset_stages("syn", shape=fixed.shape)
    assert not isinstance(register(fixed, inverted, stages=stages).transform, AffineTransform)


def test_register_mi_aligns_a_multimodal_pair():
    fixed = _image((32, 32, 32), spacing=(1.5, 1.5, 1.5), seed=11)
    truth = _about_centre(_rigid_world([8.0, -6.0, 5.0], [3.0, -2.0, 1.0]), fixed.geometry)
    moving = _moving_of(fixed, truth)
    x = moving.data / moving.data.max()
    moving = moving.with_data(4 * x * (1 - x))  # non-monotonic contrast, dark background kept
    out = register(fixed, moving, "rigid", seed=0)
    corners = np.array([[i, j, k, 1] for i in (6, 25) for j in (6, 25) for k in (6, 25)], float)
    world = corners @ fixed.geometry.voxel_to_world.T
    err = np.linalg.norm(world @ out.extras.matrix.T - world @ truth.T, axis=1)
    assert err.max() < 1.0, err  # mm, with 1.5 mm voxels


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_solver_optimizer_follows_torch_optim_update_rules(kind):
    from unireg.solvers.optim import make_optimizer

    target = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    ours = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    ref = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = make_optimizer([ours], kind, 0.1)
    if kind == "adam":
        ref_opt = torch.optim.Adam([ref], lr=0.1)
    else:
        ref_opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9)
    for it in range(25):
        for p, o in ((ours, opt), (ref, ref_opt)):
            o.param_groups[0]["lr"] = 0.1 / (1 + it)  # a schedule sets the rate the same way
            o.zero_grad()
            ((p - target) ** 4).sum().backward()
            o.step()
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-12)
    assert float((ours.detach() - target).abs().max()) < float(target.abs().max())  # it moved


# -- affine-gn: Gauss-Newton on locally normalised intensities --------------------------------


def test_affine_gn_recovers_a_known_affine_of_a_real_head():
    # the packaged IXI head, mapped through a known affine (rotations of 4-6 degrees, scales
    # 0.97-1.05, 6 mm shifts) onto an oblique grid of other spacing, with another gain/offset
    from importlib.resources import files

    from unireg.io import load_image

    fixed = load_image(files("unireg.demo_data") / "IXI012-HH-1211-T1_ds.nii.gz")
    geom = fixed.geometry
    truth = _about_centre(oblique_affine((1.05, 0.97, 1.02), (6, -4, 5), (4, -3, 5)), geom)
    mgeom = Geometry((110, 120, 100), oblique_affine((2.2, 2.0, 2.1), (3, -2, 4), (0, 0, 0)))
    aff = mgeom.affine.copy()
    aff[:3, 3] += (truth @ np.r_[geom.center_world, 1])[:3] - mgeom.center_world
    mgeom = Geometry(mgeom.shape, aff)
    moved = _moving_of(fixed, truth, mgeom)
    moving = Image(2.0 * moved.data + 5.0, mgeom.affine)
    result = register(fixed, moving, "affine-gn")
    assert isinstance(result.transform, AffineTransform)
    head = np.argwhere(fixed.data[0].numpy() > np.percentile(fixed.data[0].numpy(), 70))
    world = np.c_[head, np.ones(len(head))] @ geom.voxel_to_world.T
    err = np.linalg.norm(world @ result.transform.matrix.numpy().T - world @ truth.T, axis=1)
    assert err.mean() < 0.2 and err.max() < 0.5, (err.mean(), err.max())  # mm; voxels are 2 mm
    # the trace is the mean squared residual per step: lower at the end of each level
    trace = result.extras.trace
    for factor in {f for f, _, _ in trace}:
        level = [r for f, _, r in trace if f == factor]
        assert level[-1] < level[0]
    inverse = result.inverse.matrix.numpy() @ result.transform.matrix.numpy()
    assert np.allclose(inverse, np.eye(4), atol=1e-9)


def test_affine_gn_refines_from_a_given_start_beyond_its_own_capture_range():
    # the packaged head turned by 150 degrees: from the matched centres of mass alone
    # affine-gn cannot find it; started 12 degrees and 5 mm off the truth (as a keypoint alignment
    # would start it), it recovers it
    from importlib.resources import files

    from unireg.io import load_image
    from unireg.solvers.gauss_newton import affine_gauss_newton

    fixed = load_image(files("unireg.demo_data") / "IXI012-HH-1211-T1_ds.nii.gz")
    geom = fixed.geometry
    truth = _about_centre(oblique_affine((1.0, 1.0, 1.0), (150, 20, 0), (3, -4, 2)), geom)
    moving = _moving_of(fixed, truth)
    off = _about_centre(oblique_affine((1.0, 1.0, 1.0), (8, -6, 7), (5, 0, 0)), geom)
    head = np.argwhere(fixed.data[0].numpy() > np.percentile(fixed.data[0].numpy(), 70))
    world = np.c_[head, np.ones(len(head))] @ geom.voxel_to_world.T

    def error(matrix: np.ndarray) -> np.ndarray:
        return np.linalg.norm(world @ matrix.T - world @ truth.T, axis=1)

    # measured (mm, mean over the head): start 14.0, alone 134.5, refined 0.058 (max 0.16)
    start = truth @ off
    assert error(start).mean() > 10  # a coarse start
    alone, _ = affine_gauss_newton(fixed, moving, orientations=False)
    assert error(alone.matrix.numpy()).mean() > 20
    # the default also starts from the principal axes' rotations: it finds the turn alone
    found, _ = affine_gauss_newton(fixed, moving)
    err = error(found.matrix.numpy())
    assert err.mean() < 0.3 and err.max() < 0.8, (err.mean(), err.max())
    refined, _ = affine_gauss_newton(fixed, moving, init=AffineTransform(start))
    err = error(refined.matrix.numpy())
    assert err.mean() < 0.3 and err.max() < 0.8, (err.mean(), err.max())


def test_gauss_newton_on_a_small_image_recovers_a_small_affine():
    # a 24^3 image filled with texture up to its faces: the coarse levels are dropped (a level
    # keeps 12 voxels an axis) and no fixed voxel gains by leaving the moving image's view
    from unireg.solvers.gauss_newton import affine_gauss_newton

    fixed = _image((24, 26, 22), spacing=(2.0, 2.0, 2.0), seed=10)
    geom = fixed.geometry
    truth = _about_centre(oblique_affine((1.02, 0.98, 1.0), (4, -3, 2), (1.5, -1.0, 0.5)), geom)
    moving = _moving_of(fixed, truth)
    found, _ = affine_gauss_newton(fixed, moving)
    inner = np.argwhere(np.ones((16, 18, 14))) + 4  # away from the faces
    world = np.c_[inner, np.ones(len(inner))] @ geom.voxel_to_world.T
    err = np.linalg.norm(world @ found.matrix.numpy().T - world @ truth.T, axis=1)
    assert err.mean() < 0.3, err.mean()


def test_cascade_pyramid_has_the_pyramid_levels():
    # each level made from the next finer one (affine-gn's pyramid): the same shapes and, up to
    # the extra interpolation, the same values as blurring the full image for each level
    from unireg.solvers.pyramid import cascade, pyramid

    x = smooth_image((40, 37, 29), seed=1)
    x = x / x.abs().max()
    for a, b in zip(cascade(x, [8, 2, 4]), pyramid(x, [8, 2, 4]), strict=True):
        assert a.shape == b.shape
        diff = (a - b).abs()
        # measured: mean 0.033 / 0.004 / 0 of the levels' std at factors 8 / 4 / 2
        assert float(diff.mean()) < 0.06 * float(b.std()) and float(diff.max()) < 0.4 * float(
            b.std()
        )
    assert torch.equal(cascade(x, [2])[0], pyramid(x, [2])[0])


def test_principal_channels_keep_the_difference_of_low_rank_features_and_commute_with_warps():
    from unireg.solvers.pyramid import principal_channels
    from unireg.spatial.warp import warp

    gen = torch.Generator().manual_seed(0)
    # 12 channels spanned by 3 smooth maps plus an offset: rank 3 about the mean
    basis = torch.randn(3, 12, generator=gen, dtype=torch.float64)
    offset = torch.randn(12, generator=gen, dtype=torch.float64)[:, None, None, None]

    def features(seed: int) -> torch.Tensor:
        maps = torch.cat([smooth_image((14, 12, 10), seed=seed + i) for i in range(3)], 1)
        return torch.einsum("kc,bk...->bc...", basis, maps) + offset

    fixed, moving = features(1), features(7)
    f3, m3 = principal_channels(fixed, moving, 1e-9)
    assert f3.shape[1] == m3.shape[1] == 3
    # the channel-mean squared difference is kept (the discarded axes hold no variance)
    torch.testing.assert_close(((f3 - m3) ** 2).mean(), ((fixed - moving) ** 2).mean())
    # one linear map for both, commuting with interpolation: under any warp the solver's
    # objective on the kept axes equals the objective on every channel
    for seed in (3, 4):
        u = smooth_field((14, 12, 10), 0.2, seed=seed)
        torch.testing.assert_close(
            ((f3 - warp(m3, u, padding="border")) ** 2).mean(),
            ((fixed - warp(moving, u, padding="border")) ** 2).mean(),
        )
    # a looser tolerance keeps fewer axes; 0 keeps the inputs
    f1, _ = principal_channels(fixed, moving, 0.5)
    assert f1.shape[1] < 3
    same, _ = principal_channels(fixed, moving, 0.0)
    assert same is fixed
    with pytest.raises(ValueError, match="tolerance"):
        principal_channels(fixed, moving, 1.0)


def test_local_normalization_ignores_gain_and_offset():
    from unireg.solvers.gauss_newton import local_normalize

    x = smooth_image((20, 18, 16), seed=3)  # float64: the box variance cancels
    a = local_normalize(x, 5, eps=0.0)
    b = local_normalize(3.0 * x + 2.0, 5, eps=0.0)
    assert torch.allclose(a, b, atol=1e-4)
    assert float(a.abs().max()) > 0.5
    assert float(local_normalize(torch.full((1, 1, 9, 9, 9), 4.0), 3, eps=1e-3).abs().max()) < 1e-6


def test_affine_gn_refuses_what_it_cannot_do():
    from unireg.solvers import preset_stages

    fixed = _image((24, 24, 24))
    with pytest.raises(ValueError, match="same-modality"):
        register(fixed, fixed, "affine-gn", multimodal=True)
    with pytest.raises(ValueError, match="not made of solver stages"):
        preset_stages("affine-gn")
    with pytest.raises(ValueError, match="preset"):
        register(fixed, fixed, "affine-gn", preset="slow")


def test_masks_and_label_prompts_match_levels_made_octave_by_octave():
    # 54, 60 and 44 voxels: their 1/8 levels made by halving three times have 7, 9 and 7
    # voxels, one resampling of the full grid would give 8, 8 and 6 (the mask of a 1 mm MNI
    # image crashed the affine stage this way)
    from unireg.solvers import LabelPrompt, Level, Stage, solve
    from unireg.solvers.pyramid import level_shape

    shape = (54, 60, 44)
    assert level_shape(level_shape(level_shape(shape, 2), 2), 2) != level_shape(shape, 8)
    image = smooth_image(shape, seed=2)
    labels = (image > image.mean()).long()
    mask = torch.ones(1, 1, *shape)
    mask[..., :5] = 0
    stage = Stage(model="affine", levels=[Level(8, 3), Level(4, 3)], loss="mse")
    out = solve(image, image, [stage], foreground_mask=mask,
                prompts=[LabelPrompt(labels, labels, 0.5)])  # fmt: skip
    assert np.allclose(out.matrix, np.eye(4), atol=0.05)


def test_deformable_iterations_replace_the_preset_levels():
    """``iterations`` (1/4, 1/2, full resolution; 0 skips a level) sets the deformable stage's
    levels: the fast preset's own counts give its stages (syn, bspline and ffd end with a
    short full-resolution level on grids of 1.5 mm or coarser), a full-resolution level runs
    where asked, and linear methods and malformed counts are refused."""
    from conftest import demo_brains

    from unireg.methods import registry
    from unireg.methods.base import OptionError
    from unireg.solvers.solver import Level

    shape = (120, 120, 90)
    # the fast LNCC stages: a short full-resolution level on 1.5 mm grids or coarser only
    fine = (240, 240, 180)
    for method, levels in [("syn", (60, 10, 2)), ("bspline", (60, 10, 3)), ("ffd", (80, 10, 1))]:
        assert preset_stages(method, shape=shape, iterations=levels) == preset_stages(
            method, shape=shape, spacing=(2.0, 2.0, 2.0)
        )
        # (both on the 1 mm grid: the LNCC window follows the spacing too, 7 voxels there)
        one_mm = {"shape": fine, "spacing": (1.0, 1.0, 1.0)}
        assert preset_stages(method, **one_mm, iterations=(80, 40, 0)) == preset_stages(
            method, **one_mm
        )
        assert preset_stages(method, **one_mm)[-1].loss_options == {"window": 7}
    for other in (dict(deformable="svf"), dict(multimodal=True)):
        assert (
            preset_stages("syn", **other, shape=shape, spacing=(2.0, 2.0, 2.0))[-1].levels
            == preset_stages("syn", **other, shape=fine, spacing=(1.0, 1.0, 1.0))[-1].levels
        )
    dense = preset_stages("ffd", shape=shape, iterations=(60, 0, 5))[-1]
    assert dense.levels == [Level(4, 60), Level(1, 5)]
    with pytest.raises(ValueError, match="affine has none"):
        preset_stages("affine", shape=shape, iterations=(1, 1, 1))
    with pytest.raises(ValueError, match="three counts"):
        preset_stages("syn", shape=shape, iterations=(0, 0, 0))
    for bad in ("unireg:affine:iterations=1,2,3", "unireg:syn:iterations=1,2"):
        with pytest.raises(OptionError, match="iterations"):
            registry.parse_spec(bad)
    fixed, moving, _, _ = demo_brains()
    _, opts = registry.parse_spec("unireg:syn:iterations=20,10,2")
    method = registry.create("syn", opts)
    greedy = [t for t in method.register(fixed, moving).extras.trace if t["model"] == "greedy"]
    assert [t["factor"] for t in greedy] == [4.0, 2.0, 1.0]
    assert list(greedy[-1]["shape"]) == list(fixed.shape) and greedy[-1]["iterations"] <= 2
