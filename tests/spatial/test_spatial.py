"""Property tests of the spatial core (tensors only, no files)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import oblique_affine, smooth_field, smooth_image

from unireg.spatial import (
    AffineTransform,
    CompositeTransform,
    DisplacementFieldTransform,
    Geometry,
    affine_from_parameters,
    affine_grid,
    compose_affine,
    compose_displacements,
    displacement_from_world,
    displacement_to_points,
    displacement_to_world,
    identity_grid,
    invert_affine,
    jacobian_determinant,
    normalized_map_matrix,
    points_to_displacement,
    random_affine,
    resize_displacement,
    sample,
    scaling_and_squaring,
    transform_points,
    voxel_grid,
    warp,
    warp_affine,
    warp_labels,
    world_map_matrix,
    world_points,
)
from unireg.spatial.geometry import voxel_to_normalized_matrix

SHAPES = [(20, 26), (12, 16, 10)]


def interior(t: torch.Tensor, margin: int) -> torch.Tensor:
    """Crop ``margin`` voxels from every spatial side of ``(B, C, *spatial)``."""
    idx = [slice(None), slice(None)] + [slice(margin, -margin)] * (t.ndim - 2)
    return t[tuple(idx)]


# ---------------------------------------------------------------------------------- grids/frames


@pytest.mark.parametrize("shape", SHAPES)
def test_identity_grid_matches_voxel_to_normalized(shape):
    grid = identity_grid(shape, dtype=torch.float64)
    expected = transform_points(
        voxel_to_normalized_matrix(shape), voxel_grid(shape, dtype=torch.float64)
    )
    assert grid.shape == (1, *shape, len(shape))
    torch.testing.assert_close(grid, expected, atol=1e-12, rtol=0)
    assert grid[(0, *[0] * len(shape))].tolist() == [-1.0] * len(shape)
    assert grid[(0, *[-1] * len(shape))].tolist() == [1.0] * len(shape)


def test_geometry_frames_round_trip_and_anisotropy():
    geom = Geometry((30, 20, 10), oblique_affine((0.8, 1.5, 3.0), (10, -20, 35), (5, -7, 11)))
    assert geom.spacing == pytest.approx((0.8, 1.5, 3.0))
    pts = np.random.default_rng(0).uniform(-1, 1, (50, 3))
    world = pts @ geom.normalized_to_world[:3, :3].T + geom.normalized_to_world[:3, 3]
    back = world @ geom.world_to_normalized[:3, :3].T + geom.world_to_normalized[:3, 3]
    np.testing.assert_allclose(back, pts, atol=1e-12)
    # normalised corners are the first and last voxel centres
    corner = geom.normalized_to_world @ np.array([1.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(corner, geom.affine @ np.array([29, 19, 9, 1.0]), atol=1e-9)
    # size-1 axes stay invertible
    flat = Geometry((8, 1, 5), np.diag([1.0, 2.0, 3.0, 1.0]))
    assert np.all(np.isfinite(flat.world_to_normalized))


def test_world_and_normalized_affines_are_inverse_conversions():
    fixed = Geometry((30, 20, 10), oblique_affine((1, 1.5, 3), (5, 0, 0), (0, 0, 0)))
    moving = Geometry((25, 25, 12), oblique_affine((2, 1, 2.5), (0, 30, -10), (10, 5, -3)))
    world = random_affine(3, rotation=30, translation=10, shear=0.1, seed=3, dtype=torch.float64)[0]
    norm = normalized_map_matrix(world.numpy(), fixed, moving)
    np.testing.assert_allclose(world_map_matrix(norm, fixed, moving), world.numpy(), atol=1e-9)


# -------------------------------------------------------------------------------------- warping


@pytest.mark.parametrize("shape", SHAPES)
def test_warp_by_identity_returns_image(shape):
    img = smooth_image(shape, channels=3).float().expand(2, -1, *shape)
    zero = torch.zeros(2, len(shape), *shape)
    for mode in ("linear", "nearest"):
        torch.testing.assert_close(warp(img, zero, mode=mode), img, atol=1e-5, rtol=0)
    eye = torch.eye(len(shape) + 1).expand(2, -1, -1)
    torch.testing.assert_close(warp_affine(img, eye), img, atol=1e-5, rtol=0)


def test_sample_axis_order_is_tensor_order():
    # a ramp along axis 0 only: moving a point along axis 0 must change the value, axis 1 not.
    img = torch.arange(5.0).view(1, 1, 5, 1).expand(1, 1, 5, 7).contiguous()
    pts = torch.tensor([[[[0.5, -1.0]]], [[[0.5, 1.0]]]])  # (2, 1, 1, 2)
    out = sample(img, pts)
    assert out.flatten().tolist() == pytest.approx([3.0, 3.0])


@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_and_inverse_compose_to_identity(ndim):
    m = random_affine(ndim, 16, rotation=180, translation=0.5, scale=(0.5, 2.0), shear=0.3, seed=1)
    for dtype in (torch.float32, torch.float64):
        mm = m.to(dtype)
        eye = torch.eye(ndim + 1, dtype=dtype).expand_as(mm)
        assert (compose_affine(mm, invert_affine(mm)) - eye).abs().max() < 1e-5
        assert (compose_affine(invert_affine(mm), mm) - eye).abs().max() < 1e-5
    torch.testing.assert_close(invert_affine(m.double()), torch.linalg.inv(m.double()))
    # as point maps on a grid
    pts = affine_grid(compose_affine(m, invert_affine(m)), (9, 7, 5)[:ndim])
    assert (pts - identity_grid((9, 7, 5)[:ndim])).abs().max() < 1e-5


def test_compose_affine_order_is_point_map_order():
    a = affine_from_parameters(translation=torch.tensor([[1.0, 0.0]]))
    b = affine_from_parameters(scale=torch.tensor([[2.0, 1.0]]))
    p = torch.tensor([[[3.0, 4.0]]])
    # a(b(p)) = 2*3 + 1
    assert transform_points(compose_affine(a, b), p)[0, 0].tolist() == [7.0, 4.0]


def _blob(shape, centre_vox, sigma=2.0):
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij")
    r2 = sum((a - c) ** 2 for a, c in zip(axes, centre_vox, strict=True))
    return torch.exp(-r2 / (2 * sigma**2))[None, None]


def _centroid(img):
    img = img[0, 0]
    axes = torch.meshgrid(*[torch.arange(n, dtype=img.dtype) for n in img.shape], indexing="ij")
    return torch.stack([(a * img).sum() / img.sum() for a in axes])


def test_points_built_scaled_and_reversed_in_one_pass_with_every_derivative():
    # scale x displacement, channels reversed, plus the identity: the same points as the
    # scaled copy flipped, for a batch against the shared grid, in 2D and 3D, with first and
    # second derivatives (gradcheck, gradgradcheck)
    for shape in ((5, 4, 3), (6, 5)):
        d = len(shape)
        u = torch.randn(2, d, *shape, dtype=torch.float64)
        factors = tuple(0.5 + k for k in range(d))
        scale = torch.tensor(factors, dtype=u.dtype).view(1, d, *[1] * d)
        for rev in (False, True):
            got = displacement_to_points(u, reversed_axes=rev, scale=factors)
            want = displacement_to_points(u * scale)
            torch.testing.assert_close(got, want.flip(-1) if rev else want)
            x = u[:1].clone().requires_grad_(True)

            def f(x: torch.Tensor, rev: bool = rev, factors: tuple = factors) -> torch.Tensor:
                return displacement_to_points(x, reversed_axes=rev, scale=factors).square()

            assert torch.autograd.gradcheck(f, (x,))
            assert torch.autograd.gradgradcheck(f, (x,))
    with pytest.raises(ValueError, match="3 factors"):
        displacement_to_points(torch.zeros(1, 3, 2, 2, 2), scale=(1.0, 2.0))


def test_random_affine_warp_agrees_with_moving_points():
    """Warping an image and mapping points by the same world affine agree (< 0.5 voxel), across
    anisotropic, differently oriented fixed and moving grids."""
    fixed = Geometry((40, 36, 30), oblique_affine((1.2, 1.0, 1.5), (0, 0, 10), (-20, -18, -20)))
    moving = Geometry((44, 30, 34), oblique_affine((1.0, 1.4, 1.3), (15, -5, 0), (-22, -20, -21)))
    worst = 0.0
    for seed in range(4):
        world = random_affine(
            3,
            rotation=20,
            translation=3,
            scale=(0.9, 1.1),
            shear=0.05,
            seed=seed,
            center=torch.tensor(fixed.center_world),
            dtype=torch.float64,
        )[0]
        # pick a point in the fixed image, find where the affine sends it in the moving image
        p_fixed_vox = torch.tensor([18.0 + seed, 17.0, 14.0 - seed], dtype=torch.float64)
        p_fixed_world = transform_points(fixed.affine, p_fixed_vox)
        p_moving_vox = transform_points(
            moving.world_to_voxel, transform_points(world, p_fixed_world)
        )
        # a blob at that moving point, warped onto the fixed grid, lands back on the fixed point
        img = _blob(moving.shape, p_moving_vox.tolist())
        warped = AffineTransform(world).warp(img, moving, fixed)
        err = (_centroid(warped) - p_fixed_vox).norm().item()
        worst = max(worst, err)
    # the acceptance bound is 0.5 voxel; measured 0.004 voxel, so hold it to 0.05
    assert worst < 0.05, worst


@pytest.mark.parametrize("shape", [(48, 40), (30, 34, 26)])
def test_displacement_composition_equals_warping_twice(shape):
    u = smooth_field(shape, 0.1, seed=1)
    v = smooth_field(shape, 0.1, seed=2)
    # On images linear in space, linear interpolation is exact, so warping twice and warping
    # once by the composition must agree to rounding wherever the points stay inside the grid.
    ramp = identity_grid(shape, dtype=torch.float64).movedim(-1, 1) * 3.0 + 1.0
    twice = warp(warp(ramp, u), v)
    once = warp(ramp, compose_displacements(u, v))
    assert interior(twice - once, 4).abs().max() < 1e-10
    # composing matters: adding the displacements is measurably wrong
    assert interior(twice - warp(ramp, u + v), 4).abs().max() > 1e-2
    # on a smooth image they differ by one extra interpolation only (measured <= 1.2% of range)
    img = smooth_image(shape)
    err = interior(warp(warp(img, u), v) - warp(img, compose_displacements(u, v)), 3).abs().max()
    assert err < 0.02 * img.abs().max(), err
    # for affine fields linear interpolation is exact, so composition is exact inside the grid
    a = random_affine(len(shape), rotation=10, translation=0.05, seed=4, dtype=torch.float64)
    b = random_affine(len(shape), rotation=10, translation=0.05, seed=5, dtype=torch.float64)
    da = points_to_displacement(affine_grid(a, shape))
    db = points_to_displacement(affine_grid(b, shape))
    dab = points_to_displacement(affine_grid(compose_affine(a, b), shape))
    inside = interior(compose_displacements(da, db) - dab, 3)
    assert inside.abs().max() < 1e-10


def test_displacement_points_round_trip():
    u = smooth_field((10, 12, 8), 0.2)
    torch.testing.assert_close(points_to_displacement(displacement_to_points(u)), u)
    # built in grid_sample's (reversed) axis order: the same points, coordinates reversed
    rev = displacement_to_points(u, reversed_axes=True)
    assert rev.is_contiguous()
    assert torch.equal(rev, displacement_to_points(u).flip(-1))
    image = torch.rand(1, 2, 9, 11, 7, dtype=u.dtype)
    torch.testing.assert_close(
        warp(image, u, padding="border"), sample(image, displacement_to_points(u), padding="border")
    )


@pytest.mark.parametrize("ndim", [2, 3])
def test_resize_displacement_represents_same_map(ndim):
    m = random_affine(
        ndim, rotation=15, translation=0.1, scale=(0.9, 1.1), seed=7, dtype=torch.float64
    )
    small, big = (9, 11, 7)[:ndim], (17, 21, 13)[:ndim]
    d_small = points_to_displacement(affine_grid(m, small))
    d_big = points_to_displacement(affine_grid(m, big))
    torch.testing.assert_close(resize_displacement(d_small, big), d_big, atol=1e-10, rtol=0)
    # voxel units scale with resolution
    to_vox = torch.tensor([(n - 1) / 2 for n in small], dtype=torch.float64).view(
        1, ndim, *[1] * ndim
    )
    to_vox_big = torch.tensor([(n - 1) / 2 for n in big], dtype=torch.float64).view(
        1, ndim, *[1] * ndim
    )
    resized = resize_displacement(d_small * to_vox, big, units="voxel")
    torch.testing.assert_close(resized, d_big * to_vox_big, atol=1e-9, rtol=0)


def test_displacement_world_conversion_round_trip_and_matches_affine():
    fixed = Geometry((14, 12, 10), oblique_affine((1.0, 1.5, 2.0), (0, 10, 0), (0, 0, 0)))
    moving = Geometry((16, 10, 12), oblique_affine((2.0, 1.0, 1.2), (5, 0, -5), (3, -2, 1)))
    world = random_affine(3, rotation=10, translation=4, seed=9, dtype=torch.float64)[0]
    norm = torch.from_numpy(normalized_map_matrix(world.numpy(), fixed, moving))
    disp_n = points_to_displacement(affine_grid(norm, fixed.shape))
    disp_w = displacement_to_world(disp_n, fixed, moving)
    # world displacement equals T(x) - x at every fixed voxel
    x = transform_points(fixed.affine, voxel_grid(fixed.shape, dtype=torch.float64))
    expected = (transform_points(world, x) - x).movedim(-1, 1)
    torch.testing.assert_close(disp_w, expected, atol=1e-9, rtol=0)
    torch.testing.assert_close(
        displacement_from_world(disp_w, fixed, moving), disp_n, atol=1e-12, rtol=0
    )


# ------------------------------------------------------------------------------------ Jacobians


@pytest.mark.parametrize("ndim", [2, 3])
def test_jacobian_of_affine_is_matrix_determinant(ndim):
    shape = (15, 11, 9)[:ndim]
    m = random_affine(
        ndim, 3, rotation=40, scale=(0.6, 1.5), shear=0.2, seed=2, dtype=torch.float64
    )
    jac = jacobian_determinant(points_to_displacement(affine_grid(m, shape)))
    expected = torch.linalg.det(m[:, :ndim, :ndim]).view(3, *[1] * ndim)
    torch.testing.assert_close(jac, expected.expand_as(jac), atol=1e-9, rtol=0)
    # the world-frame affine has the same determinant as its normalised-frame version
    geom = Geometry(shape, np.diag([*(1.0, 2.0, 3.0)[:ndim], 1.0]))
    world = world_map_matrix(m[0].numpy(), geom, geom)
    assert np.linalg.det(world[:ndim, :ndim]) == pytest.approx(float(expected[0].flatten()[0]))


def test_jacobian_detects_folding_and_identity():
    shape = (16, 16)
    assert torch.allclose(jacobian_determinant(torch.zeros(1, 2, *shape)), torch.ones(1, *shape))
    # flip axis 0 in the middle band: x -> -x locally gives negative determinants
    pts = identity_grid(shape, dtype=torch.float64)
    folded = pts.clone()
    folded[..., 0] = -pts[..., 0]
    assert (jacobian_determinant(points_to_displacement(folded)) < 0).all()


# ------------------------------------------------------------------------ scaling and squaring


@pytest.mark.parametrize("shape", [(40, 36), (24, 20, 22)])
def test_scaling_and_squaring_inverse_is_near_identity(shape):
    v = smooth_field(shape, 0.15, seed=3)  # up to ~2-3 voxels of velocity
    fwd = scaling_and_squaring(v, 7)
    inv = scaling_and_squaring(-v, 7)
    to_vox = torch.tensor([(n - 1) / 2 for n in shape], dtype=torch.float64).view(
        1, -1, *[1] * len(shape)
    )
    err = (interior(compose_displacements(fwd, inv), 2) * to_vox).norm(dim=1)
    max_disp = (fwd * to_vox).norm(dim=1).max().item()
    # measured (7 steps): mean 0.004, max 0.06 voxel for displacements up to 1.4-2.6 voxels;
    # the residual is the linear interpolation of the field inside each squaring
    assert max_disp > 1.0
    assert err.mean().item() < 0.01 and err.max().item() < 0.1, (err.mean(), err.max())
    assert (jacobian_determinant(fwd) > 0).all()


def test_scaling_and_squaring_of_constant_field_is_translation():
    v = torch.zeros(1, 3, 8, 8, 8, dtype=torch.float64)
    v[:, 0] = 0.1
    torch.testing.assert_close(scaling_and_squaring(v), v, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------- labels


@pytest.mark.parametrize("method", ["nearest", "onehot"])
@pytest.mark.parametrize("shape", SHAPES)
def test_label_warps_keep_only_existing_values(method, shape):
    g = torch.Generator().manual_seed(0)
    values = torch.tensor([0, 3, 7, 42, 1000])
    coarse = values[torch.randint(0, 5, (1, 1, *[4] * len(shape)), generator=g)]
    labels = torch.nn.functional.interpolate(coarse.float(), size=shape, mode="nearest").long()
    pts = displacement_to_points(smooth_field(shape, 0.1).float())
    pts = transform_points(random_affine(len(shape), rotation=20, scale=(0.8, 1.2), seed=1), pts)
    out = warp_labels(labels, pts, method=method)
    assert out.dtype == labels.dtype and out.shape == labels.shape
    assert set(out.unique().tolist()) <= set(values.tolist())
    assert len(out.unique()) >= 3
    # identity keeps the labels exactly
    same = warp_labels(labels, identity_grid(shape), method=method)
    assert torch.equal(same, labels)


def test_label_warp_background_outside_field_of_view():
    labels = torch.full((1, 1, 6, 6), 5, dtype=torch.long)
    pts = identity_grid((6, 6)) + 3.0  # entirely outside
    for method in ("nearest", "onehot"):
        out = warp_labels(labels, pts, method=method, background=2)
        assert (out == 2).all()


def test_onehot_label_warp_smoother_than_nearest_on_downsampling():
    # both keep values; on a half-voxel shift the onehot result still holds only input values
    labels = torch.zeros(1, 1, 20, 20, dtype=torch.long)
    labels[..., 5:15, 5:15] = 9
    pts = identity_grid((20, 20)) + 0.5 * 2 / 19
    a = warp_labels(labels, pts, method="onehot")
    assert set(a.unique().tolist()) == {0, 9}


# --------------------------------------------------------------------- transforms in world space


def test_world_transform_warp_matches_point_mapping_for_fields():
    geom = Geometry((20, 18, 16), oblique_affine((1.0, 1.2, 1.5), (0, 0, 20), (-10, -10, -12)))
    field = smooth_field(geom.shape, 0.1, seed=4)
    disp_w = displacement_to_world(field, geom, geom)[0].float()
    t = DisplacementFieldTransform(disp_w, geom)
    x = transform_points(geom.affine, voxel_grid(geom.shape, dtype=torch.float64))
    # on its own grid, interpolation at the nodes returns the nodes
    mapped = t.map_points(x)
    torch.testing.assert_close(mapped - x, disp_w.movedim(0, -1)[None].double(), atol=1e-4, rtol=0)
    # the generic path (interpolate the field) and the on-grid path agree
    other = Geometry(geom.shape, geom.affine.copy())
    generic = super(DisplacementFieldTransform, t).moving_points(other, geom, dtype=torch.float64)
    fast = t.moving_points(geom, geom, dtype=torch.float64)
    torch.testing.assert_close(generic, fast, atol=1e-5, rtol=0)


@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_folded_trilinear_sampling_equals_grid_sample_3d(padding):
    # without gradients, 3D linear sampling of a field-sized volume runs as 2D bilinear
    # sampling of its stacked slices: the same values as the 3D sampler, inside, at the faces
    # and beyond them (within one voxel the zero padding blends, farther it is 0)
    import torch.nn.functional as F

    from unireg.spatial.warp import _folds

    vol = smooth_image((9, 11, 7), seed=5, channels=3).float() * 10.0
    gen = torch.Generator().manual_seed(0)
    pts = torch.rand(2, 13, 6, 5, 3, generator=gen) * 3.0 - 1.5
    pts[0, 0, 0, :3] = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, 0.3], [1.1, 0.0, -1.05]])
    vol = vol.expand(2, -1, -1, -1, -1)
    assert _folds(vol, pts, "linear", padding)
    reference = F.grid_sample(vol, pts.flip(-1), padding_mode=padding, align_corners=True)
    torch.testing.assert_close(sample(vol, pts, padding=padding), reference, atol=5e-5, rtol=0)
    torch.testing.assert_close(
        sample(vol, pts.flip(-1), padding=padding, reversed_axes=True), reference,
        atol=5e-5, rtol=0,
    )  # fmt: skip
    if padding == "zeros":
        assert float(reference.abs().max()) > 1 and float(reference.eq(0).float().mean()) > 0.05
    # with gradients the 3D sampler runs (and differentiates)
    leaf = vol.clone().requires_grad_(True)
    assert not _folds(leaf, pts, "linear", padding)
    torch.testing.assert_close(sample(leaf, pts, padding=padding), reference, atol=0, rtol=0)


@pytest.mark.parametrize("shape", [(80, 60, 9), (20, 24, 22), (90, 70)])
@pytest.mark.parametrize("odd", [False, True])
def test_one_image_sampled_in_parts_across_threads_equals_one_call(shape, odd):
    # a single image's points are split into parts sampled as a batch (one thread each; an
    # odd count pads the last part): the same values, in the same places, and the same
    # gradients, with respect to the image and to the points
    import torch.nn.functional as F

    from unireg.spatial.warp import _parts

    d = len(shape)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        image = smooth_image(shape, seed=2, channels=2).float().requires_grad_(True)
        gen = torch.Generator().manual_seed(1)
        # 33792 points, or an odd 33667 / 42575: two parts
        out_shape = {(2, False): (256, 132), (3, False): (64, 132, 4),
                     (2, True): (257, 131), (3, True): (65, 131, 5)}[d, odd]  # fmt: skip
        pts = torch.rand(1, *out_shape, d, generator=gen) * 2.4 - 1.2
        assert _parts(1, pts[0, ..., 0].numel()) == 2
        pts.requires_grad_(True)
        out = sample(image, pts, padding="zeros")
        ref = F.grid_sample(image, pts.flip(-1), padding_mode="zeros", align_corners=True)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
        g, gp = torch.autograd.grad((out * ref.detach()).sum(), (image, pts))
        g_ref, gp_ref = torch.autograd.grad((ref * ref.detach()).sum(), (image, pts))
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gp, gp_ref, atol=1e-5, rtol=1e-5)
        pts = pts.detach()
        with torch.no_grad():  # the folded 3D path is split the same way
            border = F.grid_sample(image, pts.flip(-1), padding_mode="border", align_corners=True)
            torch.testing.assert_close(
                sample(image, pts, padding="border"), border, atol=5e-5, rtol=0
            )
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_axis_aligned_warp_affine_equals_grid_sample(ndim, padding):
    # grids whose axes agree up to order and sign (a change of grid between two scans, a
    # zoom, a shift partly out of the field of view) take the separable path: it must give
    # grid_sample's values, including the zero / border padding at and beyond the faces
    from unireg.spatial.warp import _axis_permutation, warp_affine

    rng = np.random.default_rng(ndim)
    image = smooth_image((13, 11, 9)[:ndim], seed=3, channels=2)
    for _ in range(4):
        perm = rng.permutation(ndim)
        m = np.eye(ndim + 1)
        m[:ndim, :ndim] = 0
        for k in range(ndim):
            m[perm[k], k] = rng.choice([-1, 1]) * rng.uniform(0.4, 1.6)
        m[:ndim, ndim] = rng.uniform(-0.6, 0.6, ndim)
        matrix = torch.from_numpy(m)
        assert _axis_permutation(matrix, ndim) == list(perm)
        shape = (17, 8, 12)[:ndim]
        fast = warp_affine(image, matrix, shape, padding=padding)
        slow = sample(image, affine_grid(matrix.float(), shape), padding=padding)
        assert float(slow.abs().max()) > 0.1
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    # an oblique map is not separable and keeps the grid_sample path
    oblique = torch.from_numpy(
        random_affine(ndim, rotation=10, seed=0, dtype=torch.float64)[0].numpy()
    )
    assert _axis_permutation(oblique, ndim) is None


def test_field_and_affine_chain_fast_path_equals_point_mapping():
    # [field, affine] (ANTs' registration output, SITReg's result) folds the affine into the
    # moving frame and resamples its field once: the same points as mapping every voxel
    # through both transforms, for a field on another (oblique) grid than the reference
    field_geom = Geometry((12, 10, 9), oblique_affine((2.0, 2.2, 2.5), (5, 0, 10), (-12, -11, -9)))
    ref = Geometry((15, 14, 11), oblique_affine((1.5, 1.5, 2.0), (0, 8, 0), (-10, -10, -10)))
    moving = Geometry((10, 12, 13), oblique_affine((2.0, 1.8, 1.6), (-5, 3, 0), (-9, -10, -11)))
    u = 3.0 * smooth_field(field_geom.shape, 1.0, seed=7)[0]  # mm
    affine = AffineTransform(random_affine(3, rotation=15, translation=4, seed=3,
                                           dtype=torch.float64)[0])  # fmt: skip
    chain = CompositeTransform([DisplacementFieldTransform(u, field_geom), affine])
    fast = chain.moving_points(ref, moving, dtype=torch.float64)
    generic = super(CompositeTransform, chain).moving_points(ref, moving, dtype=torch.float64)
    assert (
        float((generic - affine.moving_points(ref, moving, dtype=torch.float64)).abs().max()) > 0.05
    )
    torch.testing.assert_close(fast, generic, atol=1e-5, rtol=0)
    # and the field's displacement on the reference grid (0 outside its own grid)
    t = chain.transforms[0]
    x = world_points(ref, dtype=torch.float64)
    expected = (t.map_points(x) - x)[0].movedim(-1, 0).float()
    torch.testing.assert_close(t.displacement(ref), expected, atol=1e-4, rtol=0)
    # the chain's displacement reads the field at the reference voxels: the point mapping's
    for grid in (ref, field_geom):
        x = world_points(grid, dtype=torch.float64)
        expected = (chain.map_points(x) - x)[0].movedim(-1, 0).float()
        assert float((expected - affine.displacement(grid)).abs().max()) > 0.05
        torch.testing.assert_close(chain.displacement(grid), expected, atol=1e-4, rtol=0)


def test_composite_transform_order_and_affine_inverse():
    a = AffineTransform(np.diag([2.0, 1.0, 1.0, 1.0]))
    b_mat = np.eye(4)
    b_mat[0, 3] = 5.0
    b = AffineTransform(b_mat)
    p = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    assert CompositeTransform([a, b]).map_points(p)[0, 0].item() == pytest.approx(7.0)  # b(a(p))
    assert CompositeTransform([b, a]).map_points(p)[0, 0].item() == pytest.approx(12.0)  # a(b(p))
    q = CompositeTransform([a, a.inverse()]).map_points(p)
    torch.testing.assert_close(q, p)
    # a chain of affines warps exactly like the single product matrix
    geom = Geometry((9, 8, 7), oblique_affine((1.0, 2.0, 1.5), (10, 0, 5), (-4, -8, -5)))
    m1 = random_affine(3, rotation=20, translation=2, seed=1, dtype=torch.float64)[0]
    m2 = random_affine(3, rotation=20, translation=2, seed=2, dtype=torch.float64)[0]
    chain = CompositeTransform([AffineTransform(m1), AffineTransform(m2)])
    single = AffineTransform(m2 @ m1)
    torch.testing.assert_close(
        chain.moving_points(geom, geom, dtype=torch.float64),
        single.moving_points(geom, geom, dtype=torch.float64),
    )


# --------------------------------------------------------------------------------- gradients


def test_sampling_gradients_match_finite_differences():
    img = smooth_image((6, 7)).requires_grad_(True)
    pts = (identity_grid((5, 4), dtype=torch.float64) * 0.7 + 0.05).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda i, p: sample(i, p), (img, pts), atol=1e-6)


def test_points_reversed_for_the_sampler_as_flip_with_its_gradients():
    # the sampler's axis reversal: flip's values, and first and second derivatives (3D
    # sampling with gradients to the points takes this path)
    from unireg.spatial.warp import _REVERSE_MIN_ELEMENTS, _Reverse, _reversed

    for n in (4, _REVERSE_MIN_ELEMENTS // 3 + 1):  # below and above the size for _Reverse
        x = torch.randn(1, n, 3)
        assert torch.equal(_reversed(x), x.flip(-1))
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.equal(_Reverse.apply(x), x.flip(-1))
    assert torch.autograd.gradcheck(_Reverse.apply, (x,))
    assert torch.autograd.gradgradcheck(_Reverse.apply, (x,))
    img = smooth_image((5, 6, 4)).requires_grad_(True)
    pts = (identity_grid((3, 4, 3), dtype=torch.float64) * 0.7 + 0.05).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda i, p: sample(i, p), (img, pts), atol=1e-6)


def test_gradients_flow_through_field_operations():
    v = (smooth_field((10, 9, 8), 0.1) * 1.0).requires_grad_(True)
    img = smooth_image((10, 9, 8))
    phi = scaling_and_squaring(v, 4)
    loss = warp(img, phi).square().mean() + jacobian_determinant(phi).var()
    loss.backward()
    assert v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ random affine


def test_random_affine_is_seeded_and_respects_ranges():
    a = random_affine(
        3, 8, rotation=30, translation=(1, 2, 3), scale=(0.8, 1.25), shear=0.1, seed=5
    )
    b = random_affine(
        3, 8, rotation=30, translation=(1, 2, 3), scale=(0.8, 1.25), shear=0.1, seed=5
    )
    c = random_affine(
        3, 8, rotation=30, translation=(1, 2, 3), scale=(0.8, 1.25), shear=0.1, seed=6
    )
    assert torch.equal(a, b) and not torch.equal(a, c)
    # without a seed it follows torch's global RNG, which it does not reseed
    torch.manual_seed(123)
    u1, after1 = random_affine(3, rotation=30, dtype=torch.float64), torch.rand(1)
    torch.manual_seed(123)
    u2, after2 = random_affine(3, rotation=30, dtype=torch.float64), torch.rand(1)
    assert torch.equal(u1, u2) and torch.equal(after1, after2)
    t = a[:, :3, 3].abs()
    assert (t <= torch.tensor([1, 2, 3]) + 1e-6).all()
    rot = random_affine(3, 64, rotation=30, seed=1, dtype=torch.float64)
    r = rot[:, :3, :3]
    torch.testing.assert_close(
        r @ r.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(64, 3, 3)
    )
    assert torch.allclose(torch.linalg.det(r), torch.ones(64, dtype=torch.float64))
    # a single-axis rotation angle never exceeds the range
    r2 = random_affine(2, 64, rotation=30, seed=2, dtype=torch.float64)[:, :2, :2]
    angles = torch.rad2deg(torch.atan2(r2[:, 1, 0], r2[:, 0, 0]))
    assert angles.abs().max() <= 30 + 1e-9 and angles.abs().max() > 20
    # rotation about a centre keeps the centre fixed
    centre = torch.tensor([3.0, -2.0, 7.0], dtype=torch.float64)
    m = random_affine(3, rotation=90, seed=3, center=centre, dtype=torch.float64)[0]
    torch.testing.assert_close(transform_points(m, centre), centre)
    assert math.isclose(float(torch.linalg.det(m[:3, :3])), 1.0, rel_tol=1e-9)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize(
    "padding,stride,dilation",
    [("zeros", 1, 1), ("replicate", 1, 1), ("replicate", 1, 2), ("valid", 2, 2), ("zeros", 3, 1)],
)
def test_filter_axis_matches_depthwise_convolution_and_its_adjoint(ndim, padding, stride, dilation):
    from unireg.spatial.filters import filter_axis

    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 2, *[11, 10, 9][:ndim], dtype=torch.float64, generator=g)
    k = torch.rand(5, dtype=torch.float64, generator=g)
    for axis in range(ndim):
        fast = filter_axis(x, k, axis, padding=padding, stride=stride, dilation=dilation)
        # a kernel that needs a gradient takes the convolution path: the reference
        ref = filter_axis(x, k.clone().requires_grad_(True), axis, padding=padding,
                          stride=stride, dilation=dilation)  # fmt: skip
        assert fast.shape == ref.shape
        assert torch.allclose(fast, ref.detach(), atol=1e-12)
        # the adjoint, on a smaller input (still longer than any reach)
        xr = x[(slice(None), slice(0, 1)) + (slice(0, 9),) * ndim].clone().requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda t, a=axis: filter_axis(t, k, a, padding=padding, stride=stride,
                                          dilation=dilation),
            (xr,),
        )  # fmt: skip


@pytest.mark.parametrize("padding", ["zeros", "replicate"])
@pytest.mark.parametrize("taps", [4, 7, 15])
@pytest.mark.parametrize("by", ["shifts", "matrix"])
def test_same_size_filtering_equals_filtering_the_padded_input(padding, taps, by, monkeypatch):
    """The "same"-size correlation reads the input where padding would have been (no padded
    copy), by shifted adds or (small tensors) by its banded matrix: either equals the valid
    correlation of the explicitly padded input, for even and odd kernels and a kernel longer
    than the axis (replicate), and has an exact adjoint and a second derivative."""
    import torch.nn.functional as F

    import unireg.spatial.filters as filters
    from unireg.spatial.filters import filter_axis

    monkeypatch.setattr(filters, "_MATMUL_MAX_ELEMENTS", 0 if by == "shifts" else 1 << 30)

    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, 3, 9, 5, 6, dtype=torch.float64, generator=g)
    k = torch.rand(taps, dtype=torch.float64, generator=g)
    for axis in range(3):
        for dilation in (1, 2):
            reach = dilation * (taps - 1)
            if padding == "zeros" and reach % 2:
                continue
            pads = [0, 0] * 3
            pads[2 * (2 - axis)], pads[2 * (2 - axis) + 1] = reach // 2, reach - reach // 2
            mode = "replicate" if padding == "replicate" else "constant"
            ref = filter_axis(F.pad(x, pads, mode=mode), k, axis, padding="valid",
                              dilation=dilation)  # fmt: skip
            out = filter_axis(x, k, axis, padding=padding, dilation=dilation)
            assert out.shape == x.shape
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    # the adjoint and its derivative, on a small input (every axis shorter than the reach)
    xr = torch.rand(1, 1, 4, 3, 2, dtype=torch.float64, generator=g).requires_grad_(True)
    for axis in range(3):
        fn = lambda t, a=axis: filter_axis(t, k, a, padding=padding, dilation=2)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (xr,))
        assert torch.autograd.gradgradcheck(fn, (xr,))


def test_linear_about_leaves_the_centre_fixed_and_is_a_conjugated_linear_map():
    from scipy.spatial.transform import Rotation

    from unireg.spatial.geometry import apply_matrix_np, linear_about

    lin = Rotation.random(1, random_state=4).as_matrix()[0] * 1.1
    c = np.array([12.0, -40.0, 7.5])
    m = linear_about(lin, c)
    np.testing.assert_allclose(apply_matrix_np(m, c[None])[0], c, atol=1e-12)
    shift, back = np.eye(4), np.eye(4)
    shift[:3, 3], back[:3, 3] = c, -c
    lin4 = np.eye(4)
    lin4[:3, :3] = lin
    np.testing.assert_allclose(m, shift @ lin4 @ back, atol=1e-12)


def test_an_extended_grid_keeps_the_voxel_positions_of_the_original():
    import numpy as np

    from unireg.spatial.geometry import Geometry

    a = np.array([[0, 0, 2.0, 5], [0, -1.5, 0, 7], [3.0, 0, 0, -2], [0, 0, 0, 1]])
    g = Geometry((6, 5, 4), a)
    big = g.extended([1, 2, 3], [4, 0, 2])
    assert big.shape == (11, 7, 9)
    np.testing.assert_allclose(big.spacing, g.spacing)
    # original voxel (i, j, k) is voxel (i + 1, j + 2, k + 3) of the extended grid
    for ijk in [(0, 0, 0), (5, 4, 3), (2, 1, 3)]:
        inner = np.append(np.array(ijk, float), 1.0)
        outer = np.append(np.array(ijk, float) + [1, 2, 3], 1.0)
        np.testing.assert_allclose(big.voxel_to_world @ outer, g.voxel_to_world @ inner)
