"""The SITReg network: the symmetric update, the multi-resolution network (standard and lite)
swap exactly, compose to the identity and do not fold; training lowers its loss and resumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_resumes_exactly, voxel_lengths

from unireg.spatial import compose_displacements


def test_symmetric_update_swaps_exactly_and_composes_to_identity():
    from unireg.methods.sitreg import BoundedBSplineUpdate, symmetric_update

    torch.manual_seed(0)
    f = BoundedBSplineUpdate(2, channels=3, hidden=8).double()
    for p in f.parameters():  # away from the zero (identity) initialisation
        torch.nn.init.normal_(p, std=0.5)
    a = torch.randn(1, 3, 12, 11, dtype=torch.float64)
    b = torch.randn(1, 3, 12, 11, dtype=torch.float64)
    with torch.no_grad():
        fwd, inv = symmetric_update(f, a, b, (23, 21), tol=1e-6)
        fwd2, inv2 = symmetric_update(f, b, a, (23, 21), tol=1e-6)
    assert torch.equal(fwd, inv2) and torch.equal(inv, fwd2)  # exactly swapped
    assert float(voxel_lengths(fwd).max()) > 0.5  # a real deformation
    # forward o inverse is the identity up to linear interpolation of strongly varying
    # fields (control spacing 2 voxels, every control point near the bound): measured
    # 0.051 mean, 0.33 max voxel for a 1.9-voxel update
    err = voxel_lengths(compose_displacements(fwd, inv))[:, 3:-3, 3:-3]
    assert float(err.mean()) < 0.07 and float(err.max()) < 0.45
    with torch.no_grad():
        control, _, bound = f.control_points(a, b, (23, 21))
    assert float(control.abs().max()) <= bound


def test_sitreg_is_symmetric_inverse_consistent_and_does_not_fold():
    from unireg.methods.sitreg import SITReg
    from unireg.spatial.field import jacobian_determinant

    torch.manual_seed(1)
    net = SITReg(2, channels=(4, 8, 8), hidden=8, tol=1e-5).double()
    for upd in net.updates:  # leave the identity initialisation: a real deformation
        for p in upd.parameters():
            torch.nn.init.normal_(p, std=0.15)
    a = torch.rand(1, 1, 33, 29, dtype=torch.float64)
    b = torch.rand(1, 1, 33, 29, dtype=torch.float64)
    with torch.no_grad():
        fwd, inv = net(a, b)
        fwd2, inv2 = net(b, a)
    assert torch.equal(fwd, inv2) and torch.equal(inv, fwd2)  # swapped inputs: swapped, exactly
    assert float(voxel_lengths(fwd).max()) > 1.0
    # inverse consistency up to linear interpolation of the composed fields: measured 0.045
    # mean / 0.19 max voxel for this rough random 1.8-voxel deformation; the inversion
    # layer's own residual is below 1e-5 voxel
    err = voxel_lengths(compose_displacements(fwd, inv))[:, 4:-4, 4:-4]
    assert float(err.mean()) < 0.07 and float(err.max()) < 0.3
    assert float(jacobian_determinant(fwd).min()) > 0 and float(jacobian_determinant(inv).min()) > 0
    # "complete" inference: also exactly symmetric and fold-free, and closer to inverse
    # consistency on average (measured 0.040 vs 0.045 mean voxel) without coarse resampling
    with torch.no_grad():
        cf, ci = net(a, b, inference="complete")
        cf2, ci2 = net(b, a, inference="complete")
    assert torch.equal(cf, ci2) and torch.equal(ci, cf2)
    assert float(jacobian_determinant(cf).min()) > 0 and float(jacobian_determinant(ci).min()) > 0
    err_c = voxel_lengths(compose_displacements(cf, ci))[:, 4:-4, 4:-4]
    assert float(err_c.mean()) < float(err.mean())
    # "fast" inference (the finest update on its own half-resolution grid, the results
    # upsampled): exactly symmetric and fold-free as well; near the standard deformation
    # (measured 0.12 mean voxel apart, of 1.8) and a little less inverse consistent (0.074 vs
    # 0.045 mean voxel, as the upsampled pair is no longer inverted on the output grid)
    with torch.no_grad():
        ff, fi = net(a, b, inference="fast")
        ff2, fi2 = net(b, a, inference="fast")
    assert torch.equal(ff, fi2) and torch.equal(fi, ff2)
    assert float(jacobian_determinant(ff).min()) > 0 and float(jacobian_determinant(fi).min()) > 0
    assert float(voxel_lengths(ff - fwd).mean()) < 0.15
    err_f = voxel_lengths(compose_displacements(ff, fi))[:, 4:-4, 4:-4]
    assert float(err_f.mean()) < 0.08
    with pytest.raises(ValueError, match="inference"):
        net(a, b, inference="quick")


def test_sitreg_with_a_strided_stem_is_symmetric_and_does_not_fold():
    # stem_stride 2 (the "lite" network): the finest features are at half resolution and
    # predict the last update themselves; every level has an update
    from unireg.methods.sitreg import SITReg
    from unireg.spatial.field import jacobian_determinant, resize_displacement

    torch.manual_seed(3)
    net = SITReg(2, channels=(4, 8, 8), hidden=8, tol=1e-5, stem_stride=2).double()
    assert len(net.updates) == 3 and net.config["stem_stride"] == 2
    for upd in net.updates:
        for p in upd.parameters():
            torch.nn.init.normal_(p, std=0.15)
    a = torch.rand(1, 1, 33, 29, dtype=torch.float64)
    b = torch.rand(1, 1, 33, 29, dtype=torch.float64)
    for inference in ("standard", "fast"):
        with torch.no_grad():
            fwd, inv = net(a, b, inference=inference)
            fwd2, inv2 = net(b, a, inference=inference)
        assert fwd.shape[2:] == a.shape[2:]
        assert torch.equal(fwd, inv2) and torch.equal(inv, fwd2)
        assert float(voxel_lengths(fwd).max()) > 1.0
        assert float(jacobian_determinant(fwd).min()) > 0
        assert float(jacobian_determinant(inv).min()) > 0
        # measured 0.060 (standard) and 0.078 (fast) mean voxel for this 3.4-voxel deformation
        err = voxel_lengths(compose_displacements(fwd, inv))[:, 4:-4, 4:-4]
        assert float(err.mean()) < 0.1, (inference, float(err.mean()))
    # "fast" without resizing: the same two fields on the half-resolution grid
    with torch.no_grad():
        small, small_inv = net(a, b, inference="fast", resize=False)
    assert small.shape[2:] == (17, 15)
    assert torch.allclose(resize_displacement(small, (33, 29)), fwd)
    with pytest.raises(ValueError, match="stem_stride"):
        SITReg(2, stem_stride=3)


def test_sitreg_training_lowers_its_loss_resumes_exactly_and_reloads(tmp_path):
    from test_keymorph import _tiny_manifest

    from unireg.methods import load_checkpoint
    from unireg.methods.sitreg.training import SITRegConfig, SITRegTrainer

    manifest = _tiny_manifest(tmp_path)

    def config(name, steps):
        return SITRegConfig(
            output=str(tmp_path / name), manifest=str(manifest), datasets=["toy"],
            shape=[16, 16, 16], channels=[4, 8, 8], hidden=8, steps=steps, checkpoint_every=3,
            lr=3e-3, dice_weight=0.5, synthesis_probability=0.0,
        )  # fmt: skip

    assert_resumes_exactly(SITRegTrainer, config, 6, atol=1e-6)
    model, payload = load_checkpoint(tmp_path / "straight" / "last.pt")
    assert payload.method == "sitreg" and payload.step == 6
    # training lowers the loss on a fixed pair (evaluated before and after 30 more steps)
    trainer = SITRegTrainer(config("longer", 30))
    g0 = trainer._generator()
    with torch.no_grad():
        before = float(trainer.loss(g0))
    trainer.run(progress=False)
    trainer.step = 0
    with torch.no_grad():
        after = float(trainer.loss(trainer._generator()))
    assert after < before
    # the strided-stem network trained as used ("fast"): it reloads with its stem
    lite = config("lite", 3)
    lite.stem_stride, lite.inference = 2, "fast"
    assert all(np.isfinite(SITRegTrainer(lite).run(progress=False)))
    model, _ = load_checkpoint(tmp_path / "lite" / "last.pt")
    assert model.config["stem_stride"] == 2 and len(model.updates) == 3
    bad = tmp_path / "bad.toml"
    bad.write_text('inference = "quick"\n')
    with pytest.raises(ValueError, match=r"bad.toml.*inference"):
        SITRegConfig.from_file(bad)
