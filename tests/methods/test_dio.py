"""DIO as a method: the feature network on any grid, one set of weights under every transform
model, prompts that change the objective, options, the CLI contract and training."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import assert_resumes_exactly, demo_brains
from test_keymorph import _tiny_manifest

from unireg.io import load_image, load_labels
from unireg.io.image import resample
from unireg.methods import registry
from unireg.methods.base import OptionError, Prompts, parse_iterations
from unireg.methods.dio.inference import feature_grid, register_dio
from unireg.methods.dio.model import BACKBONES, FeatureNet
from unireg.metrics import consistency_error, dice, jacobian_stats, transform_jacobian
from unireg.solvers.pyramid import level_shape
from unireg.spatial.transform import AffineTransform
from unireg.training.checkpoint import Checkpoint, save_checkpoint

TRAIN = {"solver_lr": 0.25, "smooth_gradient": 1.0, "smooth_field": 0.5, "tolerance": 1e-3,
         "window": 4}  # fmt: skip
PREP = {"spacing_mm": 2.0, "shape": [24, 24, 24], "center": "mass"}
FAST = (20, 10, 5)


def _net(seed: int = 0, backbone: str = "lku") -> FeatureNet:
    torch.manual_seed(seed)
    return FeatureNet(3, (4, 8, 8), 4, backbone).eval()


def _checkpoint() -> Checkpoint:
    return Checkpoint("dio", {}, {}, preprocessing=PREP, train_config=TRAIN)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_features_come_on_the_solver_pyramid_of_any_grid(backbone):
    net = FeatureNet(3, (2, 4, 4), 3, backbone)
    for shape in [(9, 12, 10), (16, 17, 23)]:
        out = net(torch.rand(2, 1, *shape))
        assert sorted(out) == [1.0, 2.0, 4.0]
        for factor, feats in out.items():
            assert feats.shape == (2, 3, *level_shape(shape, factor))
    coarse = net(torch.rand(1, 1, 9, 12, 10), factors=[4.0, 2.0])
    assert sorted(coarse) == [2.0, 4.0]
    with pytest.raises(ValueError, match="factors"):
        net(torch.rand(1, 1, 9, 12, 10), factors=[3.0])
    rebuilt = FeatureNet.from_config(net.config)
    rebuilt.load_state_dict(net.state_dict())
    x = torch.rand(1, 1, 9, 12, 10)
    torch.testing.assert_close(rebuilt(x)[1.0], net(x)[1.0])
    with pytest.raises(ValueError, match="backbone"):
        FeatureNet(3, backbone="vit")


@pytest.mark.parametrize("backbone", BACKBONES)
def test_merged_blocks_give_the_same_features(backbone):
    # each large-kernel block's four branches folded into one 5^d convolution: the same
    # features (float rounding), in 2D and 3D; the copy leaves the trained network alone
    for ndim, shape in [(3, (13, 11, 9)), (2, (21, 18))]:
        torch.manual_seed(ndim)
        net = FeatureNet(ndim, (3, 4, 6), 5, backbone).eval()
        before = {k: v.clone() for k, v in net.state_dict().items()}
        merged = net.merged()
        assert merged.is_merged and not net.is_merged
        x = torch.rand(2, 1, *shape)
        with torch.no_grad():
            a, b = net(x), merged(x)
        for factor in a:
            torch.testing.assert_close(b[factor], a[factor], rtol=1e-4, atol=1e-4)
        assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
        changed = any(m.merged is not None for m in merged.modules() if hasattr(m, "k5"))
        assert changed == backbone.startswith("lku")


@pytest.mark.parametrize("coarsest", [True, False])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_a_channels_last_trunk_gives_the_same_features_in_the_default_layout(backbone, coarsest):
    # the CPU inference layout: the trunk's weights and input channels-last (the 1/4 level's
    # block too, or not), its levels and the heads' features back in the default layout; 2D
    # networks are left as they are
    torch.manual_seed(0)
    net = FeatureNet(3, (3, 4, 6), 5, backbone).merged()
    fast = copy.deepcopy(net).channels_last(coarsest)
    assert fast.is_channels_last and not net.is_channels_last
    assert fast.stem[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    coarse = next(p for p in fast.enc2.parameters() if p.ndim == 5)
    assert coarse.is_contiguous(memory_format=torch.channels_last_3d) == coarsest
    x = torch.rand(1, 1, 13, 11, 9)
    with torch.no_grad():
        a, b = net(x), fast(x)
    for factor in a:
        assert b[factor].stride() == a[factor].stride()
        torch.testing.assert_close(b[factor], a[factor], rtol=1e-5, atol=1e-5)
    # projected heads (1 of 5 channels: at most half of every level's, so run channels-last)
    # and the sampled full-resolution head: the same, in the same layout
    basis = torch.linalg.qr(torch.rand(5, 1))[0].T
    with torch.no_grad():
        ta, tb = net.trunk(x), fast.trunk(x)
        for factor in (4.0, 2.0, 1.0):
            pa, pb = net.head(ta, factor, basis), fast.head(tb, factor, basis)
            assert pb.stride() == pa.stride() and pb.shape[1] == 1
            torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-5)
        sa, sb = net.head(ta, 1.0, every=2), fast.head(tb, 1.0, every=2)
        assert sb.stride() == sa.stride()
        torch.testing.assert_close(sb, sa, rtol=1e-5, atol=1e-5)
    flat = FeatureNet(2, (3, 4, 6), 5, backbone).merged().channels_last()
    assert not flat.is_channels_last


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last_3d])
def test_a_single_channel_convolution_runs_on_onednn_with_the_same_output_and_gradients(fmt):
    from torch.profiler import ProfilerActivity, profile

    from unireg.nets.blocks import single_channel_conv

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 4, 3, padding=1)
    # depth x height above 10240: oneDNN with the zero channel, the reference kernel without
    x = torch.rand(1, 1, 104, 100, 3, requires_grad=True)
    ref = conv(x.contiguous(memory_format=fmt))
    (gx_ref, gw_ref) = torch.autograd.grad(ref.square().sum(), (x, conv.weight))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = single_channel_conv(conv, x, fmt)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=fmt)  # the layout asked for, kept
    gx, gw = torch.autograd.grad(out.square().sum(), (x, conv.weight))
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-4, atol=1e-4)
    kernels = {e.key for e in prof.key_averages()}
    assert "aten::slow_conv3d_forward" not in kernels
    if torch.backends.mkldnn.is_available():
        assert "aten::mkldnn_convolution" in kernels
    # a batch, or a second channel, is the convolution as it is
    two = torch.rand(2, 1, 6, 5, 4)
    torch.testing.assert_close(single_channel_conv(conv, two, fmt), conv(two), rtol=0, atol=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_projected_and_sampled_heads_are_the_projection_and_the_sample_of_the_features(ndim):
    # the head is linear: k projected kernels give the projected features; a strided head
    # gives the features at every second voxel; the pair's full-resolution basis, estimated
    # on that sample, keeps the full level's difference as the exact projection does
    from unireg.methods.dio.inference import pair_features
    from unireg.solvers.pyramid import principal_axes, project_channels

    torch.manual_seed(0)
    shape = (14, 11, 9) if ndim == 3 else (22, 17)
    net = FeatureNet(ndim, (3, 4, 6), 5, "lku-e").eval()
    x, y = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
    basis = torch.randn(2, 5)
    with torch.no_grad():
        full = net(x)
        trunk = net.trunk(x)
        for f in full:
            torch.testing.assert_close(net.head(trunk, f), full[f])
            torch.testing.assert_close(
                net.head(trunk, f, basis), project_channels(basis, full[f]), rtol=1e-4, atol=1e-5
            )
        every = (slice(None), slice(None)) + (slice(None, None, 2),) * ndim
        torch.testing.assert_close(net.head(trunk, 1.0, every=2), full[1.0][every])
        with pytest.raises(ValueError, match="full-resolution"):
            net.head(trunk, 2.0, every=2)
        ff, fm = pair_features(net, x, y, (4.0, 2.0, 1.0), 0.2)
        other = net(y)
        sampled = principal_axes(full[1.0][every], other[1.0][every], 0.2)
        assert ff[1.0].shape[1] == sampled.shape[0] < 5
        for got, features in ((ff, full), (fm, other)):
            expected = project_channels(sampled, features[1.0])
            torch.testing.assert_close(got[1.0], expected, rtol=1e-4, atol=1e-5)
        # unprojected: each image's own features, for images of one shape or of two
        z = torch.rand(1, 1, *(n + 3 for n in shape))
        third = net(z)
        for a, b, want in ((x, y, (full, other)), (z, x, (third, full))):
            got = pair_features(net, a, b, (4.0, 2.0, 1.0), 0.0)
            for g, w in zip(got, want, strict=True):
                for f in w:
                    torch.testing.assert_close(g[f], w[f], rtol=1e-5, atol=1e-6)


def test_bfloat16_trunk_gives_float32_features_within_its_rounding(monkeypatch):
    # the trunk under bfloat16 autocast: float32 features on the same grids, equal to the
    # float32 network's within bfloat16's rounding (8 significant bits, a few layers deep)
    from unireg.methods.dio.inference import pair_features
    from unireg.methods.pipeline import network_dtype

    torch.manual_seed(0)
    net = FeatureNet(3, (3, 4, 6), 5, "lku").eval().merged()
    x, y = torch.rand(1, 1, 14, 11, 9), torch.rand(1, 1, 14, 11, 9)
    with torch.no_grad():
        exact, _ = pair_features(net, x, y, (4.0, 2.0, 1.0), 0.0)
        low, _ = pair_features(net, x, y, (4.0, 2.0, 1.0), 0.0, torch.bfloat16)
    for f in exact:
        assert low[f].dtype == torch.float32 and low[f].shape == exact[f].shape
        err = (low[f] - exact[f]).norm() / exact[f].norm()
        assert 0 < err < 0.03, (f, float(err))  # rounded, and only to bfloat16's precision
    assert network_dtype("float32") == torch.float32
    assert network_dtype("bfloat16", "cpu") == torch.bfloat16
    assert network_dtype("auto", "cuda") == torch.float32
    for native in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda n=native: n)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert network_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    with pytest.raises(ValueError, match="precision"):
        network_dtype("float16")


def test_the_network_layout_follows_the_cpu_and_number_format(monkeypatch):
    # channels-last where it was measured faster: bfloat16 on CPUs, float32 on AVX2 CPUs;
    # never on a GPU; the method lays its network out so when built
    from unireg.methods import create, options_for
    from unireg.methods.pipeline import channels_last_pays

    for isa, f32 in (("AVX2", True), ("DEFAULT", False), ("AVX512", False), ("SVE256", False)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda isa=isa: isa)
        assert channels_last_pays(torch.float32, "cpu") is f32
        assert channels_last_pays(torch.bfloat16, "cpu") is True
        assert channels_last_pays(torch.float32, "cuda") is False
        net = create("dio", options_for("dio", {"model": "lku-e", "precision": "float32"})).model
        assert net.is_channels_last is f32
        weight = net.enc0.merged.weight
        assert weight.is_contiguous(memory_format=torch.channels_last_3d) is f32


def test_resolution_matching_blurs_the_finer_image_along_the_other_images_thick_axis():
    from unireg.io.image import Image
    from unireg.methods.pipeline import resolution_matched

    # an impulse on a 2 mm grid against an image of 5 mm slices along world z
    data = torch.zeros(1, 9, 9, 31)
    data[0, 4, 4, 15] = 1.0
    impulse = Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    thick = Image(torch.zeros(1, 9, 9, 6), np.diag([2.0, 2.0, 5.0, 1.0]))
    out = resolution_matched(impulse, thick)
    profile = out.data[0, 4, 4].double()
    # blurred along z only, by a Gaussian of FWHM 5 mm less the own 2 mm: sigma^2 in voxels
    assert torch.count_nonzero(out.data[0, :, :, 15]) == 1
    z = torch.arange(31, dtype=torch.float64) - 15
    variance = float((profile * z**2).sum() / profile.sum())
    expected = (5.0**2 - 2.0**2) / 2.355**2 / 2.0**2
    assert abs(variance - expected) < 0.02 * expected, (variance, expected)
    np.testing.assert_allclose(float(out.data.sum()), 1.0, rtol=1e-5)  # mass kept
    # the same thick axis, but the other image's voxel axes permuted (its first axis along z)
    permuted = np.array([[0, 0, 2.0, 0], [0, 2.0, 0, 0], [5.0, 0, 0, 0], [0, 0, 0, 1.0]])
    swapped = Image(torch.zeros(1, 6, 9, 9), permuted)
    torch.testing.assert_close(resolution_matched(impulse, swapped).data, out.data)
    # the coarser image, and a partner of about the same resolution, are left as they are
    assert resolution_matched(thick, impulse) is thick
    near = Image(torch.zeros(1, 9, 9, 28), np.diag([2.0, 2.0, 2.2, 1.0]))
    assert resolution_matched(impulse, near) is impulse


def test_dio_matches_resolution_only_for_pairs_of_different_resolution(tmp_path):
    _tiny_manifest(tmp_path)
    fixed, moving = load_image(tmp_path / "s0.nii.gz"), load_image(tmp_path / "s1.nii.gz")
    net = _net()

    def run(fixed, moving, match):
        return register_dio(fixed, moving, model=net, checkpoint=_checkpoint(), iterations=FAST,
                            affine="none", match_resolution=match).transform  # fmt: skip

    same = [run(fixed, moving, m).map_points(torch.zeros(1, 3)) for m in (False, True)]
    torch.testing.assert_close(same[0], same[1])
    # moving on 3x thicker slices: the fixed image's features change, so does the map
    coarse = moving.geometry.regrid((*moving.spacing[:2], 3 * moving.spacing[2]))
    thick = resample(moving, coarse)
    points = torch.tensor([[10.0, -5.0, 3.0]], dtype=torch.float64)
    moved = [run(fixed, thick, m).map_points(points) for m in (False, True)]
    assert not torch.allclose(moved[0], moved[1])


def test_the_feature_grid_keeps_the_field_of_view_at_the_training_spacing(tmp_path):
    _tiny_manifest(tmp_path)
    image = load_image(tmp_path / "s1.nii.gz")  # 2 mm, oblique
    assert feature_grid(image, 2.0).same_grid(image.geometry)
    grid = feature_grid(image, 4.0)
    np.testing.assert_allclose(grid.spacing, 4.0)
    np.testing.assert_allclose(grid.center_world, image.geometry.center_world, atol=1e-6)
    # the same field of view (n voxels of 2 mm: n / 2 of 4 mm), to half a new voxel per side
    extent = np.array(grid.shape) * 4.0
    np.testing.assert_allclose(extent, np.array(image.shape) * 2.0, atol=4.0)


def test_one_set_of_weights_under_every_transform_model(tmp_path):
    _tiny_manifest(tmp_path)
    fixed, moving = load_image(tmp_path / "s0.nii.gz"), load_image(tmp_path / "s1.nii.gz")
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    results = {}
    for transform in ("ffd", "diffeo", "svf", "bspline", "affine"):
        res = register_dio(fixed, moving, model=net, checkpoint=_checkpoint(),
                           transform=transform, iterations=FAST, affine="none")  # fmt: skip
        results[transform] = res
        assert res.extras.transform_kind == transform
        # an inverse where the model has one: by construction, or a diffeomorphism inverted
        assert (res.inverse is None) == (transform in ("ffd", "bspline"))
        # every level lowers the feature loss it started from
        assert all(e["loss_last"] < e["loss_first"] for e in res.extras.trace)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])  # the same weights served every model
    assert isinstance(results["affine"].transform, AffineTransform)
    geom = fixed.geometry
    world = torch.as_tensor(geom.corners_world, dtype=torch.float32)
    mapped = {t: r.transform.map_points(world) for t, r in results.items()}
    assert float((mapped["ffd"] - mapped["diffeo"]).abs().max()) > 1e-3
    # the diffeomorphic models do not fold
    for t in ("diffeo", "svf"):
        stats = jacobian_stats(transform_jacobian(results[t].transform, geom))
        assert stats["folding_percent"] == 0.0
    # svf's inverse comes by construction, diffeo's by inversion: both undo the forward map
    # inside the grid (this untrained, unregularised solve moves the faces by ~1 cm, past
    # where the fields are defined). Measured p95: 0.12-0.23 mm (2 mm voxels)
    inner = np.zeros(geom.shape, bool)
    inner[5:-5, 5:-5, 5:-5] = True
    for t in ("svf", "diffeo"):
        res = results[t]
        there = consistency_error([res.transform, res.inverse], geom, mask=inner)
        back = consistency_error([res.inverse, res.transform], moving.geometry, mask=inner)
        assert there["p95_mm"] < 0.3 and back["p95_mm"] < 0.3


def test_without_full_resolution_iterations_the_field_is_held_at_half_resolution(tmp_path):
    _tiny_manifest(tmp_path)
    fixed, moving = load_image(tmp_path / "s0.nii.gz"), load_image(tmp_path / "s1.nii.gz")
    res = register_dio(fixed, moving, model=_net(), checkpoint=_checkpoint(),
                       iterations=(20, 10, 0), affine="none")  # fmt: skip
    grid = res.extras.feature_grids[0]
    assert grid.shape == level_shape(fixed.shape, 2)
    np.testing.assert_allclose(grid.corners_world, fixed.geometry.corners_world, atol=1e-6)
    assert [e["factor"] for e in res.extras.trace] == [2.0, 1.0]
    assert res.warped is not None and res.warped.shape == fixed.shape


def test_feature_tolerance_registers_fewer_channels(tmp_path):
    _tiny_manifest(tmp_path)
    fixed, moving = load_image(tmp_path / "s0.nii.gz"), load_image(tmp_path / "s1.nii.gz")
    fl, ml = load_labels(tmp_path / "s0_lab.nii.gz"), load_labels(tmp_path / "s1_lab.nii.gz")
    net = _net()
    every = register_dio(fixed, moving, model=net, checkpoint=_checkpoint(), iterations=FAST,
                         affine="none")  # fmt: skip
    fewer = register_dio(fixed, moving, model=net, checkpoint=_checkpoint(), iterations=FAST,
                         affine="none", tolerance=0.05)  # fmt: skip
    assert every.extras.channels == {4.0: 4, 2.0: 4, 1.0: 4}
    assert sorted(fewer.extras.channels) == [1.0, 2.0, 4.0]
    assert min(fewer.extras.channels.values()) < 4
    # dropping 5 % of the variance of untrained features changes the result only a little
    d_every = np.mean(list(dice(fl, every.warp(ml)).values()))
    d_fewer = np.mean(list(dice(fl, fewer.warp(ml)).values()))
    assert abs(d_every - d_fewer) < 0.05, (d_every, d_fewer)


def test_prompts_change_the_objective(tmp_path):
    _tiny_manifest(tmp_path)
    fixed, moving = load_image(tmp_path / "s0.nii.gz"), load_image(tmp_path / "s1.nii.gz")
    fl, ml = load_labels(tmp_path / "s0_lab.nii.gz"), load_labels(tmp_path / "s1_lab.nii.gz")
    net = _net()

    def run(prompts: Prompts | None):
        res = register_dio(fixed, moving, model=net, checkpoint=_checkpoint(), prompts=prompts,
                           iterations=FAST, affine="none")  # fmt: skip
        return res, float(np.mean(list(dice(fl, res.warp(ml)).values())))

    plain, dice_plain = run(None)
    prompted, dice_prompted = run(Prompts(fl, ml, label_weight=2.0))
    # the label term is in the objective: the labels overlap better with it
    assert dice_prompted > dice_plain + 0.02
    # landmarks: a fixed point asked to land 4 mm away along x gets closer to its target
    point = np.asarray([fixed.geometry.center_world])
    target = point + np.asarray([[4.0, 0.0, 0.0]])
    marked, _ = run(Prompts(fixed_landmarks=point, moving_landmarks=target, landmark_weight=50.0))
    x = torch.as_tensor(point, dtype=torch.float32)
    t = torch.as_tensor(target, dtype=torch.float32)
    far = float((plain.transform.map_points(x) - t).norm())
    near = float((marked.transform.map_points(x) - t).norm())
    assert near < far - 0.5


def test_options_spec_strings_and_iterations():
    entry, opts = registry.parse_spec("dio:diffeo:iterations=50,20,5:affine=none")
    assert entry.name == "dio" and opts.transform == "diffeo" and opts.affine == "none"
    assert parse_iterations(opts.iterations) == (50, 20, 5)
    assert parse_iterations("0,0,30") == (0, 0, 30)
    for bad in ("50,20", "a,b,c", "0,0,0", "5,-1,3"):
        with pytest.raises(OptionError, match="iterations"):
            registry.parse_spec(f"dio:iterations={bad}")
    with pytest.raises(OptionError, match="transform"):
        registry.parse_spec("dio:tps")


def test_register_cli_dio_writes_the_contract_with_a_switched_model(tmp_path, capsys):
    from unireg.cli import main

    _tiny_manifest(tmp_path)
    ckpt = save_checkpoint(tmp_path / "m.pt", "dio", _net(), preprocessing=PREP,
                           train_config=TRAIN)  # fmt: skip
    out = tmp_path / "out"
    rc = main(["register", str(tmp_path / "s0.nii.gz"), str(tmp_path / "s1.nii.gz"), "-o",
               str(out), "--method", "dio", "--model", str(ckpt), "--transform", "svf",
               "--iterations", "10,5,2", "--affine-stage", "none",
               "--fixed-labels", str(tmp_path / "s0_lab.nii.gz"),
               "--moving-labels", str(tmp_path / "s1_lab.nii.gz"), "--label-prompt", "1",
               "--quiet", "--no-hd95"])  # fmt: skip
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    assert {"warped.nii.gz", "warped_labels.nii.gz", "transform.nii.gz", "affine.mat",
            "inverse_transform.nii.gz", "metrics.json", "manifest.json"} <= names  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "dio" and metrics["transform"] == "svf"
    assert metrics["folding_percent"] == 0.0
    # landmarks (world mm CSVs): a prompt, and the TRE in metrics.json
    fixed = load_image(tmp_path / "s0.nii.gz")
    centre = fixed.geometry.center_world
    (tmp_path / "f.csv").write_text("x,y,z\n" + ",".join(map(str, centre)) + "\n")
    (tmp_path / "m.csv").write_text(",".join(map(str, centre + [3.0, 0, 0])) + "\n")
    (tmp_path / "bad.csv").write_text("1,2\n")
    marked = tmp_path / "marked"
    args = ["register", str(tmp_path / "s0.nii.gz"), str(tmp_path / "s1.nii.gz"), "--method",
            "dio", "--model", str(ckpt), "--iterations", "10,5,2", "--affine-stage", "none",
            "--quiet", "--no-hd95"]  # fmt: skip
    assert main([*args, "-o", str(marked), "--landmarks", str(tmp_path / "f.csv"),
                 str(tmp_path / "m.csv"), "--landmark-weight", "5"]) == 0  # fmt: skip
    metrics = json.loads((marked / "metrics.json").read_text())
    assert metrics["tre_mean_mm"] < 3.0
    assert metrics["inputs"]["moving_landmarks"]["path"].endswith("m.csv")
    capsys.readouterr()
    rc = main([*args, "-o", str(tmp_path / "nope"), "--landmarks", str(tmp_path / "f.csv"),
               str(tmp_path / "bad.csv")])  # fmt: skip
    assert rc == 1 and not (tmp_path / "nope").exists()
    assert "LandmarkError" in capsys.readouterr().err
    rc = main([*args[:4], "sitreg", "-o", str(tmp_path / "nope"), "--landmarks",
               str(tmp_path / "f.csv"), str(tmp_path / "m.csv"), "--quiet"])  # fmt: skip
    assert rc == 1 and "takes no landmarks prompt" in capsys.readouterr().err
    # a KeyMorph closed form is not a DIO transform model: refused before any work
    rc = main(["register", str(tmp_path / "s0.nii.gz"), str(tmp_path / "s1.nii.gz"), "-o",
               str(tmp_path / "bad"), "--method", "dio", "--model", str(ckpt), "--transform",
               "tps", "--quiet"])  # fmt: skip
    assert rc == 1 and not (tmp_path / "bad").exists()
    assert "OptionError: --method dio: option 'transform'" in capsys.readouterr().err


def test_dio_training_runs_resumes_exactly_and_reloads(tmp_path):
    from unireg.methods.dio.training import DIOConfig, DIOTrainer

    manifest = _tiny_manifest(tmp_path)

    def config(name: str, steps: int) -> DIOConfig:
        return DIOConfig(
            output=str(tmp_path / name), manifest=str(manifest), datasets=["toy"],
            shape=[16, 16, 16], channels=[2, 4, 4], features=3, steps=steps,
            checkpoint_every=2, iterations=[5, 3, 2], curriculum=[0, 1, 3],
            synthesis_probability=0.0, lr=3e-3,
        )  # fmt: skip

    straight = assert_resumes_exactly(DIOTrainer, config, 4)
    assert straight.active_levels() == 3
    model, payload = registry.load_checkpoint(tmp_path / "straight" / "last.pt")
    assert payload.method == "dio" and isinstance(model, FeatureNet)
    # held-out labels never enter the Dice term: holding out every label of the toy maps
    # leaves the image term alone, the loss of a run without Dice
    trainer = DIOTrainer(config("held", 4))
    with torch.no_grad():
        with_dice = float(trainer.loss(trainer._generator()))
        trainer.cfg.holdout_labels = [1, 2]
        held = float(trainer.loss(trainer._generator()))
        trainer.cfg.holdout_labels, trainer.cfg.dice_weight = [], 0.0
        without = float(trainer.loss(trainer._generator()))
    assert held == pytest.approx(without, rel=1e-5) and with_dice > held + 0.1
    bad = tmp_path / "bad.toml"
    bad.write_text("curriculum = [5, 1, 2]\n")
    with pytest.raises(ValueError, match=r"bad.toml.*curriculum"):
        DIOConfig.from_file(bad)


def test_invariance_loss_is_zero_for_equal_maps_two_for_opposite_ones_and_scale_free():
    from unireg.methods.dio.training import invariance_loss

    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(1, 1, 16, 16, 16, generator=g) > 0.5).float()
    x = torch.randn(1, 3, 16, 16, 16, generator=g)
    x = x - (x * mask).sum((2, 3, 4), keepdim=True) / mask.sum()  # zero mean inside the mask
    y = torch.randn(1, 3, 16, 16, 16, generator=g)
    assert float(invariance_loss(x, x, mask)) == 0.0
    assert float(invariance_loss(x, -x, mask)) == pytest.approx(2.0, rel=1e-5)
    assert float(invariance_loss(x, y, mask)) == pytest.approx(1.0, abs=0.05)  # unrelated
    assert float(invariance_loss(3 * x, 3 * y, mask)) == pytest.approx(
        float(invariance_loss(x, y, mask)), rel=1e-5
    )
    # what lies outside the mask does not count
    z = torch.where(mask > 0, y, torch.randn(1, 3, 16, 16, 16, generator=g) * 100)
    assert float(invariance_loss(x, z, mask)) == pytest.approx(
        float(invariance_loss(x, y, mask)), rel=1e-5
    )
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    invariance_loss(xs, ys, mask).backward()
    assert xs.grad is not None and ys.grad is not None
    assert float(xs.grad.abs().sum()) > 0 and float(ys.grad.abs().sum()) > 0
    assert float((xs.grad * (1 - mask)).abs().sum()) == 0.0


def test_dio_training_adds_the_invariance_term_of_a_second_contrast_of_the_fixed_view(tmp_path):
    from unireg.methods.dio.training import DIOConfig, DIOTrainer

    manifest = _tiny_manifest(tmp_path)

    def config(name: str, weight: float) -> DIOConfig:
        return DIOConfig(
            output=str(tmp_path / name), manifest=str(manifest), datasets=["toy"],
            shape=[16, 16, 16], channels=[2, 4, 4], features=3, steps=2,
            checkpoint_every=2, iterations=[5, 3, 2], curriculum=[0, 0, 0],
            synthesis_probability=1.0, invariance_weight=weight, lr=3e-3,
        )  # fmt: skip

    trainer = DIOTrainer(config("inv", 1.0))
    g = trainer._generator()
    items = trainer._pair_items(g)
    b = trainer._view(items[1], g)
    c = trainer._second_contrast(items[1], b, g)
    assert c["labels"] is b["labels"] and c["image"].shape == b["image"].shape
    assert not torch.allclose(c["image"], b["image"])  # another contrast of the same view
    # the same pair and solve with and without the term (the second view's draws come after
    # the pair's): the loss rises by the weight times one invariance term
    losses = {}
    for weight in (0.0, 1.0, 2.0):
        trainer.cfg.invariance_weight = weight
        with torch.no_grad():
            losses[weight] = float(trainer.loss(trainer._generator()))
    term = losses[1.0] - losses[0.0]
    assert term > 0.05
    assert losses[2.0] - losses[0.0] == pytest.approx(2 * term, rel=1e-3)
    trainer.cfg.invariance_weight = 1.0
    assert all(np.isfinite(trainer.run(progress=False)))
    with pytest.raises(ValueError, match="invariance_weight"):
        DIOConfig(invariance_weight=-1.0).check()
    with pytest.raises(ValueError, match="same_subject_probability"):
        DIOConfig(invariance_weight=1.0, same_subject_probability=0.5).check()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["lku", "lku-e"])
def test_the_shipped_dio_models_improve_on_their_affine_stage_on_the_demo_brains(model):
    # a sanity check of the shipped files (the demo subjects are IXI *training* subjects; the
    # accuracy on the test split is in docs/methods/dio.md)

    from unireg.metrics import registration_metrics

    if not registry.model_path("dio", model).exists():
        pytest.skip(f"no DIO model {model!r} shipped in src/unireg/models/")
    fixed, moving, fl, ml = demo_brains()
    method = registry.create(f"dio:diffeo:iterations=50,25,5:model={model}")
    res = method.register(fixed, moving)
    full = registration_metrics(res, fixed_labels=fl, moving_labels=ml, hd95=False)
    linear = registration_metrics(transform=res.affine, fixed=fixed, fixed_labels=fl,
                                  moving_labels=ml, hd95=False)  # fmt: skip
    assert full["dice_mean"] > linear["dice_mean"] + 0.05
    assert full["folding_percent"] == 0.0
