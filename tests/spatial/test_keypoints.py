"""Closed forms from matched keypoints (rigid, affine, thin-plate spline): properties."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import gaussian_blob

from unireg.spatial import fit_affine, fit_rigid, fit_tps, random_affine, transform_points
from unireg.spatial.affine import rotation_matrix


def _points(b: int, n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 60 * (torch.rand(b, n, d, generator=g, dtype=torch.float64) - 0.5)  # mm


@pytest.mark.parametrize("d", [2, 3])
def test_affine_and_rigid_recover_a_known_random_transform(d):
    fixed = _points(4, 40, d, seed=1)
    g = torch.Generator().manual_seed(2)
    affine = random_affine(
        d, 4, rotation=180.0, translation=20.0, scale=(0.8, 1.25), shear=0.1, generator=g,
        dtype=torch.float64,
    )  # fmt: skip
    moving = transform_points(affine, fixed)
    assert float((fit_affine(fixed, moving) - affine).abs().max()) < 1e-4
    angles = (torch.rand(4, 1 if d == 2 else 3, generator=g, dtype=torch.float64) - 0.5) * 6.2
    rigid = torch.eye(d + 1, dtype=torch.float64).repeat(4, 1, 1)
    rigid[:, :d, :d] = rotation_matrix(angles)
    rigid[:, :d, d] = 30 * torch.rand(4, d, generator=g, dtype=torch.float64)
    est = fit_rigid(fixed, transform_points(rigid, fixed))
    assert float((est - rigid).abs().max()) < 1e-4


def test_rigid_never_returns_a_reflection_and_weights_select_keypoints():
    fixed = _points(1, 30, 3, seed=3)
    mirrored = fixed * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)  # a reflection
    est = fit_rigid(fixed, mirrored)
    assert float(torch.linalg.det(est[0, :3, :3])) == pytest.approx(1.0, abs=1e-9)
    # weights: outliers with weight 0 do not move the affine solution
    g = torch.Generator().manual_seed(4)
    affine = random_affine(3, rotation=30.0, translation=5.0, generator=g, dtype=torch.float64)
    moving = transform_points(affine, fixed)
    moving[:, :5] += 40.0  # five corrupted keypoints
    w = torch.ones(1, 30, dtype=torch.float64)
    w[:, :5] = 0
    assert float((fit_affine(fixed, moving, w) - affine).abs().max()) < 1e-6
    assert float((fit_affine(fixed, moving) - affine).abs().max()) > 0.1


@pytest.mark.parametrize("d", [2, 3])
def test_tps_interpolates_at_lambda_zero_and_tends_to_affine(d):
    fixed = _points(2, 25, d, seed=5)
    moving = fixed + 3 * torch.sin(fixed / 10) + 2.0  # a smooth non-affine deformation
    exact = fit_tps(fixed, moving, 0.0)
    assert float((exact(fixed) - moving).abs().max()) < 1e-6
    # a huge lambda: the affine part dominates; away from the keypoints too
    probe = _points(2, 200, d, seed=6)
    affine = fit_affine(fixed, moving)
    gaps = []
    for lam in (1e2, 1e5, 1e8):
        gaps.append(float((fit_tps(fixed, moving, lam)(probe) - transform_points(affine, probe))
                          .abs().max()))  # fmt: skip
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 1e-3  # mm
    # lambda per batch element: the same as two separate fits
    both = fit_tps(fixed, moving, torch.tensor([0.0, 10.0], dtype=torch.float64))
    second = fit_tps(fixed[1:], moving[1:], 10.0)
    assert torch.allclose(both(probe)[1:], second(probe[1:]), atol=1e-8)


def test_tps_chunked_evaluation_matches_one_pass_and_affine_is_reproduced():
    fixed = _points(1, 30, 3, seed=7)
    g = torch.Generator().manual_seed(8)
    affine = random_affine(
        3, rotation=25.0, translation=5.0, scale=(0.9, 1.1), generator=g, dtype=torch.float64
    )
    tps = fit_tps(fixed, transform_points(affine, fixed), 0.0)
    probe = _points(1, 1000, 3, seed=9)
    assert torch.allclose(tps(probe, chunk=77), tps(probe, chunk=10**6), atol=1e-10)
    # an affine motion needs no bending: the TPS is that affine everywhere
    assert float((tps(probe) - transform_points(affine, probe)).abs().max()) < 1e-6
    assert float(tps.weights.abs().max()) < 1e-8


@pytest.mark.parametrize("kind", ["rigid", "affine", "tps"])
def test_gradients_reach_the_keypoints_through_every_closed_form(kind):
    from unireg.spatial import fit_keypoint_transform

    fixed = _points(2, 16, 3, seed=10).requires_grad_(True)
    moving = (fixed.detach() + torch.randn(2, 16, 3, dtype=torch.float64)).requires_grad_(True)
    out = fit_keypoint_transform(kind, fixed, moving, lam=0.1)
    probe = _points(2, 50, 3, seed=11)
    mapped = out(probe) if kind == "tps" else transform_points(out, probe)
    mapped.square().mean().backward()
    for p in (fixed, moving):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    if kind != "rigid":  # smooth everywhere: the gradient matches finite differences
        f = _points(1, 8, 2, seed=12).requires_grad_(True)
        m = (f.detach() + 0.5).requires_grad_(True)
        pr = _points(1, 5, 2, seed=13)

        def fn(a, b):
            o = fit_keypoint_transform(kind, a, b, lam=0.1)
            return o(pr) if kind == "tps" else transform_points(o, pr)

        assert torch.autograd.gradcheck(fn, (f, m))


def test_keypoint_input_errors_are_clear():
    a = torch.zeros(1, 5, 3)
    with pytest.raises(ValueError, match="same shape"):
        fit_affine(a, torch.zeros(1, 6, 3))
    with pytest.raises(ValueError, match="at least 4 keypoints"):
        fit_tps(a[:, :3], a[:, :3])
    with pytest.raises(ValueError, match=">= 0"):
        fit_tps(_points(1, 6, 3, 1), _points(1, 6, 3, 2), -1.0)


@pytest.mark.parametrize("shift", [(3, -2, 5), (0.4, -0.7, 0.25)])
def test_center_of_mass_layer_is_translation_equivariant(shift):
    from unireg.nets import CenterOfMass

    shape = (34, 30, 32)
    start = (14.0, 15.5, 13.0)
    moved = tuple(s + t for s, t in zip(start, shift, strict=True))
    maps = torch.stack([gaussian_blob(shape, start), gaussian_blob(shape, (8.0, 9.0, 7.0), 1.5)])[
        None
    ]
    maps2 = torch.stack([gaussian_blob(shape, moved), gaussian_blob(shape, (8.0, 9.0, 7.0), 1.5)])[
        None
    ]
    coords = [torch.arange(n, dtype=torch.float64) for n in shape]  # voxel units
    a = CenterOfMass()(maps, coords)
    b = CenterOfMass()(maps2, coords)
    assert torch.allclose(b[0, 0] - a[0, 0], torch.tensor(shift, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(b[0, 1], a[0, 1])  # the other map did not move
    assert torch.allclose(a[0, 0], torch.tensor(start, dtype=torch.float64), atol=1e-4)
    # default coordinates: normalised [-1, 1] of the map's grid
    norm = CenterOfMass()(maps)
    expect = [2 * s / (n - 1) - 1 for s, n in zip(start, shape, strict=True)]
    assert torch.allclose(norm[0, 0], torch.tensor(expect, dtype=torch.float64), atol=1e-4)


@pytest.mark.parametrize("head", ["com", "fc"])
@pytest.mark.parametrize("shape", [(33, 29, 20), (50, 47)])
def test_detector_takes_any_size_and_gradients_flow(head, shape):
    from unireg.nets import KeypointDetector

    torch.manual_seed(0)
    ndim = len(shape)
    net = KeypointDetector(ndim, num_keypoints=16, channels=(4, 8, 8), head=head)
    x = torch.rand(2, 1, *shape)
    kp = net(x)
    assert kp.shape == (2, 16, ndim)
    assert bool((kp.abs() <= 1.0 + 1e-6).all())  # inside the input grid
    kp.square().sum().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if head == "com":
        # coarse voxel j is centred on padded input voxel 4 j: its input-normalised coordinate
        _, coords = net.activation_maps(x)
        for n, c in zip(shape, coords, strict=True):
            before = ((-n) % 4) // 2
            j = torch.arange(c.numel(), dtype=c.dtype)
            assert torch.allclose(c, 2 * (4 * j - before) / (n - 1) - 1)


@pytest.mark.parametrize("d", [2, 3])
def test_map_upsampling_keeps_each_centre_of_mass_and_aligns_features(d):
    """``upsample_mass``: coarse voxel i on fine voxel 2 i + 1, centres of mass unchanged to
    rounding; ``upsample_strided``: coarse voxel i on fine voxel 2 i (its value there)."""
    from unireg.nets.blocks import upsample_mass, upsample_strided
    from unireg.nets.keypoints import CenterOfMass

    g = torch.Generator().manual_seed(d)
    shape = (5, 7, 4)[:d]
    maps = torch.rand(2, 3, *shape, generator=g, dtype=torch.float64) ** 4
    maps[0, 0] = 0
    maps[(0, 0, *[0] * d)] = 1.0  # all mass on a corner: the hardest case for an edge
    coarse = [torch.arange(n, dtype=torch.float64) for n in shape]
    fine = [(torch.arange(2 * n + 1, dtype=torch.float64) - 1) / 2 for n in shape]
    up = upsample_mass(maps)
    assert up.shape[2:] == tuple(2 * n + 1 for n in shape) and bool((up >= 0).all())
    com = CenterOfMass()
    assert torch.allclose(com(up, fine), com(maps, coarse), atol=1e-7)  # eps of the layer
    assert torch.equal(up[(..., *[slice(1, None, 2)] * d)], maps)
    mode = "bilinear" if d == 2 else "trilinear"
    inner = F.interpolate(maps, size=[2 * n - 1 for n in shape], mode=mode, align_corners=True)
    mixed = [2 * n - (i % 2) for i, n in enumerate(shape)]
    for parent in ([2 * n for n in shape], [2 * n - 1 for n in shape], mixed):
        feat = upsample_strided(maps, parent)
        assert feat.shape[2:] == tuple(parent)
        assert torch.allclose(feat[(..., *[slice(0, None, 2)] * d)], maps)
        # linear interpolation at coarse j / 2, the edge repeated past the last coarse voxel
        pads = [
            p
            for n, m in zip(reversed(parent), reversed(inner.shape[2:]), strict=True)
            for p in (0, n - m)
        ]
        assert torch.allclose(feat, F.pad(inner, pads, mode="replicate"), atol=1e-12)
    with pytest.raises(ValueError, match="stride-2 parent grid"):
        upsample_strided(maps, [2 * n + 1 for n in shape])
    if d == 3:  # float32 channels-last (the trilinear kernel): the same values, in that layout
        cl = maps.float().contiguous(memory_format=torch.channels_last_3d)
        for parent in ([2 * n - 1 for n in shape], mixed):
            feat = upsample_strided(cl, parent)
            torch.testing.assert_close(feat, upsample_strided(maps.float(), parent))
            if parent == [2 * n - 1 for n in shape]:
                assert feat.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("shape", [(33, 29, 20), (50, 47)])
def test_decoder_levels_start_from_the_coarse_keypoints_and_make_finer_maps(shape):
    """A detector with decoder levels, given a coarse detector's weights, detects exactly its
    keypoints (the levels start as the identity); its maps are 2**decoder times finer, their
    voxels on the input grid where the coordinates say; gradients reach the new levels."""
    from unireg.nets import KeypointDetector

    torch.manual_seed(1)
    d = len(shape)
    base = KeypointDetector(d, num_keypoints=8, channels=(4, 8, 8))
    finer = KeypointDetector(d, num_keypoints=8, channels=(4, 8, 8), decoder=2)
    missing, unexpected = finer.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("decoder.") for k in missing)
    x = torch.rand(2, 1, *shape)
    with torch.no_grad():
        assert torch.allclose(finer(x), base(x), atol=1e-5)
        coarse_maps, _ = base.activation_maps(x)
        maps, coords = finer.activation_maps(x)
    assert finer.map_stride == 1
    for n, m, c in zip(shape, coarse_maps.shape[2:], coords, strict=True):
        before = ((-n) % 4) // 2
        assert c.numel() == 4 * m + 3  # two levels, each 2 m + 1
        j = torch.arange(c.numel(), dtype=c.dtype) - 3  # first map voxel 3 before input 0
        assert torch.allclose(c, 2 * (j - before) / (n - 1) - 1)
    kp = finer(x)
    kp.square().sum().backward()
    assert all(lvl.out.weight.grad.abs().sum() > 0 for lvl in finer.decoder)
    # once trained (non-zero residuals) the levels move the keypoints
    with torch.no_grad():
        for lvl in finer.decoder:
            lvl.out.weight.normal_(0, 0.3)
        assert (finer(x) - base(x)).abs().max() > 1e-2
    with pytest.raises(ValueError, match="decoder"):
        KeypointDetector(d, channels=(4, 8), decoder=2)
    with pytest.raises(ValueError, match="decoder"):
        KeypointDetector(d, channels=(4, 8), head="fc", decoder=1)


def test_detector_keypoint_count_is_configurable_and_checked():
    from unireg.nets import KeypointDetector

    for k in (16, 512):
        assert (
            KeypointDetector(2, num_keypoints=k, channels=(4, 8))(torch.rand(1, 1, 24, 20)).shape[1]
            == k
        )
    with pytest.raises(ValueError, match="num_keypoints"):
        KeypointDetector(3, num_keypoints=0)
    with pytest.raises(ValueError, match="3D batch"):
        KeypointDetector(3, channels=(4, 8))(torch.rand(1, 1, 16, 16))
