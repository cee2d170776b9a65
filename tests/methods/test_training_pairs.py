"""Training pairs: two subjects, or one subject against a smoothly deformed copy of itself."""

from __future__ import annotations

import pytest
import torch

from unireg.data.augment import smooth_displacement


@pytest.mark.parametrize("seed", range(5))
def test_a_smooth_displacement_has_its_longest_vector_in_the_range_asked(seed):
    shape = (40, 44, 36)
    u = smooth_displacement(shape, torch.Generator().manual_seed(seed), (4.0, 8.0))
    longest = float(torch.linalg.vector_norm(u, dim=0).max())
    assert u.shape == (3, *shape) and u.dtype == torch.float64
    assert 4.0 <= longest <= 8.0
    # smooth: 5 control points per axis (about 10 voxels apart) interpolated linearly, so
    # neighbouring vectors differ by at most about 2 x longest / 10
    for axis in (1, 2, 3):
        step = float(torch.linalg.vector_norm(u.diff(dim=axis), dim=0).max())
        assert step <= 0.25 * longest
    # the same draws scaled: the direction field does not depend on the range
    again = smooth_displacement(shape, torch.Generator().manual_seed(seed), (8.0, 16.0))
    assert torch.allclose(again, 2 * u)


def _trainer(tmp_path, name, **settings):
    from test_keymorph import _tiny_manifest

    from unireg.methods.sitreg.training import SITRegConfig, SITRegTrainer

    manifest = _tiny_manifest(tmp_path)
    quiet = {"rotation": 0.0, "translation": 0.0, "scale": [1.0, 1.0], "shear": 0.0,
             "bias_field": 0.0, "noise": 0.0, "synthesis_probability": 0.0}  # fmt: skip
    cfg = SITRegConfig(output=str(tmp_path / name), manifest=str(manifest), datasets=["toy"],
                       shape=[16, 16, 16], channels=[4, 8, 8], hidden=8,
                       **{**quiet, **settings})  # fmt: skip
    return SITRegTrainer(cfg)


def test_same_subject_pairs_are_one_image_and_its_smoothly_deformed_copy(tmp_path):
    """With ``same_subject_probability`` = 1 (no affine, bias or noise) both views show one
    subject; the second is moved by the deformation alone: none leaves it equal to the first,
    a larger one moves it further (the same field scaled), and its labels keep their values."""
    differences = []
    for mm in (0.0, 2.0, 6.0):
        trainer = _trainer(tmp_path, f"same{mm}", same_subject_probability=1.0,
                           same_subject_deformation=mm)  # fmt: skip
        a, b = trainer._pair_views(torch.Generator().manual_seed(3))
        if mm == 0:
            assert torch.allclose(a["image"], b["image"], atol=1e-5)  # resampled in place
            assert torch.equal(a["labels"], b["labels"])
            continue
        assert set(torch.unique(b["labels"]).tolist()) <= set(torch.unique(a["labels"]).tolist())
        differences.append(float((a["image"] - b["image"]).abs().mean()))
    assert 0 < differences[0] < differences[1]
    # two subjects otherwise: the views differ although nothing moves them
    trainer = _trainer(tmp_path, "two", same_subject_probability=0.0)
    a, b = trainer._pair_views(torch.Generator().manual_seed(3))
    assert not torch.equal(a["image"], b["image"])


def test_same_subject_pairs_take_no_draws_when_off_and_check_their_settings(tmp_path):
    """Off, the pair is drawn exactly as two subjects' views always were (configs without
    the setting keep their random stream); bad settings are refused."""
    trainer = _trainer(tmp_path, "off", rotation=5.0, noise=0.02)
    a, b = trainer._pair_views(torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    ia, ib = trainer._pair_items(g)
    a2, b2 = trainer._view(ia, g), trainer._view(ib, g)
    assert torch.equal(a["image"], a2["image"]) and torch.equal(b["image"], b2["image"])
    with pytest.raises(ValueError, match="same_subject_probability must be in"):
        _trainer(tmp_path, "bad", same_subject_probability=1.5).cfg.check_common()
    with pytest.raises(ValueError, match="same_subject_deformation must be >= 0"):
        _trainer(tmp_path, "bad2", same_subject_deformation=-1.0).cfg.check_common()


def test_keymorph_refuses_same_subject_pairs(tmp_path):
    from test_keymorph import _tiny_config

    with pytest.raises(ValueError, match="same_subject_probability is for the deformable"):
        _tiny_config(tmp_path, "km", same_subject_probability=0.5)


def test_excluded_subjects_are_left_out_of_the_run_and_unknown_ones_are_refused(tmp_path):
    """``exclude_subjects`` holds subjects out (for validation): they are never loaded, so no
    pair can draw them; a name that is not a training volume is an error naming it."""
    trainer = _trainer(tmp_path, "held", exclude_subjects=["s1"])
    assert sorted(it["subject"] for it in trainer.volumes.items) == ["s0", "s2"]
    g = torch.Generator().manual_seed(0)
    drawn = {it["subject"] for _ in range(20) for it in trainer._pair_items(g)}
    assert drawn == {"s0", "s2"}
    with pytest.raises(ValueError, match="s9"):
        _trainer(tmp_path, "bad", exclude_subjects=["s9"])
