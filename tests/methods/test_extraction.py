"""The brain-mask network and the pairs matched in brain extraction (unireg.methods.extraction)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_resumes_exactly, smooth_image
from hypothesis import given, settings
from hypothesis import strategies as st
from test_keymorph import _tiny_manifest

from unireg.errors import UniregError
from unireg.io.image import Image, LabelMap
from unireg.methods import create, options_for
from unireg.methods.extraction.inference import (
    MIN_SHARE,
    STRIP_MARGIN_MM,
    ExtractionMatched,
    brain_mask,
    dilated,
    is_brain_extracted,
    load_brain_model,
    match_extraction,
    outside_share,
    strip,
)
from unireg.methods.extraction.model import BrainMaskNet
from unireg.methods.extraction.training import BrainMaskConfig, BrainMaskTrainer, closed_mask
from unireg.result import Extras, measured_result
from unireg.spatial.transform import AffineTransform
from unireg.training.checkpoint import Checkpoint, save_checkpoint

SHAPE = (40, 44, 36)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE[:3, 3] = [-40.0, -44.0, -36.0]


class ThresholdNet(torch.nn.Module):
    """A stand-in network: brain where the normalised intensity exceeds 0.5; counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return (x - 0.5) * 50.0


def _model() -> tuple[ThresholdNet, Checkpoint]:
    prep = {"spacing_mm": 4.0, "shape": [24, 24, 24], "center": "mass"}
    return ThresholdNet(), Checkpoint("brainmask", {}, {}, preprocessing=prep)


def _phantom(
    seed: int = 0, size: float = 0.28, scalp: float = 1.45
) -> tuple[Image, Image, torch.Tensor]:
    """A 'head' (a bright ellipsoidal brain, semi-axes ``size`` of the grid's sides, inside a
    dim scalp shell to ``scalp`` times those, scanner noise around) and the same brain
    extracted (zero outside), with the brain's voxel mask."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack(torch.meshgrid(*[torch.arange(n) for n in SHAPE], indexing="ij")).float()
    r = torch.sqrt(sum(((idx[i] - SHAPE[i] / 2) / (size * SHAPE[i])) ** 2 for i in range(3)))
    brain = r < 1.0
    head = torch.where(brain, 0.8, torch.where(r < scalp, 0.25, 0.0))
    texture = 0.05 * smooth_image(SHAPE, seed=seed)[0, 0]
    head = head + texture * brain + 0.01 * torch.rand(SHAPE, generator=g)
    extracted = torch.where(brain, head, torch.zeros(()))
    return Image(head[None], AFFINE), Image(extracted[None], AFFINE), brain


def test_the_network_keeps_any_grid_and_learns():
    net = BrainMaskNet(3, [2, 4, 4])
    x = torch.rand(1, 1, 13, 17, 11, requires_grad=True)
    y = net(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert all(p.grad is not None for p in net.parameters())
    assert BrainMaskNet.from_config(net.config).config == {"ndim": 3, "channels": [2, 4, 4]}
    with pytest.raises(ValueError, match="channels"):
        BrainMaskNet(3, [4])


def test_the_training_target_closes_one_voxel_gaps():
    labels = torch.zeros(1, 1, 9, 9, 9, dtype=torch.int16)
    labels[..., 2:7, 2:7, 2:4] = 3
    labels[..., 2:7, 2:7, 5:7] = 5  # a one-voxel gap at z = 4
    closed = closed_mask(labels)
    assert closed[0, 0, 4, 4, 4] == 1 and closed[0, 0, 4, 4, 8] == 0
    assert torch.equal(closed[labels > 0], torch.ones(int((labels > 0).sum())))


def test_brain_masks_come_back_on_the_image_grid():
    head, extracted, brain = _phantom()
    mask = brain_mask(head, _model())
    assert mask.shape == head.shape and np.allclose(mask.affine, head.affine)
    assert mask.data.dtype == torch.uint8
    inter = float((mask.data[0].bool() & brain).sum())
    assert 2 * inter / float(mask.data.sum() + brain.sum()) > 0.9


@settings(max_examples=25, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.floats(0.5, 9.0),
    st.sampled_from([(1.0, 1.0, 1.0), (2.0, 1.0, 3.0)]),
)
def test_distances_from_the_mask_are_those_of_the_whole_grid(seed, margin, spacing):
    # outside_share and dilated look only within the mask's box grown by the margin: the same
    # as distances over the whole grid, blobs at the faces included
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    inside = ndimage.gaussian_filter(rng.random((18, 15, 12)), 2.0) > 0.55
    inside[tuple(rng.integers(0, n) for n in inside.shape)] = True
    affine = np.diag([*spacing, 1.0])
    mask = LabelMap(torch.from_numpy(inside.astype(np.uint8))[None], affine)
    image = Image(
        torch.from_numpy(rng.random((1, 18, 15, 12)) * (rng.random((18, 15, 12)) > 0.3)), affine
    )
    distance = ndimage.distance_transform_edt(~inside, sampling=spacing)
    foreground = image.data[0].numpy() > 0
    expected = (foreground & (distance > margin)).sum() / foreground.sum()
    assert outside_share(image, mask, margin) == pytest.approx(expected, abs=1e-12)
    assert np.array_equal(dilated(mask, margin).data[0].numpy(), distance <= margin)


def test_the_shipped_models_mask_of_an_image_is_kept_until_the_image_changes(monkeypatch):
    """``brain_mask`` with the shipped model: asked again for the same image object it does
    not run the network; new data, data changed in place or another grid do."""
    import unireg.methods.extraction.inference as extraction

    head, _, brain = _phantom()
    calls = []

    def probability(image, model=None, device="cpu"):
        calls.append(1)
        return Image(brain[None].float(), image.affine)

    monkeypatch.setattr(extraction, "brain_probability", probability)
    first = brain_mask(head)
    assert brain_mask(head) is first and len(calls) == 1
    assert torch.equal(brain_mask(head.with_data(head.data.clone())).data, first.data)
    assert len(calls) == 2  # another image with the same values
    head.data.mul_(1.0)  # changed in place
    brain_mask(head)
    assert len(calls) == 3
    moved = AFFINE.copy()
    moved[0, 3] += 2.0
    brain_mask(head.with_data(head.data, moved))
    assert len(calls) == 4
    brain_mask(head, _model())  # another model: never kept
    assert len(calls) == 5


def test_extraction_is_read_from_the_background_and_the_mask():
    head, extracted, _ = _phantom()
    model = _model()
    assert not is_brain_extracted(head, model=model)  # noise everywhere: no network run
    assert model[0].calls == 0
    assert is_brain_extracted(extracted, model=model)
    # a head on a zeroed background (a thick scalp) passes the first test but not the mask's
    big, _, _ = _phantom(size=0.18, scalp=2.4)
    zeroed = big.with_data(torch.where(big.data > 0.1, big.data, torch.zeros(())))
    assert (zeroed.data == 0).float().mean() >= MIN_SHARE
    assert not is_brain_extracted(zeroed, model=model)


def test_a_head_is_stripped_only_against_a_brain_extracted_image():
    head, extracted, brain = _phantom()
    model = _model()
    f, m, which = match_extraction(head, extracted, model)
    assert which == "fixed" and m is extracted
    # stripped to the mask and a margin of one 2 mm voxel around it
    small = brain_mask(head, model)
    mask = dilated(small, STRIP_MARGIN_MM).data[0].bool()
    assert int(mask.sum()) > int(small.data.sum()) and torch.all(mask[small.data[0] > 0])
    assert torch.equal(f.data[0][mask], head.data[0][mask])
    assert float(f.data[0][~mask].max()) == pytest.approx(float(head.data.min()))
    f, m, which = match_extraction(extracted, head, model)
    assert which == "moving" and f is extracted
    # two heads with scanner noise: the network never runs
    other, _, _ = _phantom(seed=1)
    net = model[0]
    net.calls = 0
    f, m, which = match_extraction(head, other, model)
    assert (which, f, m, net.calls) == ("", head, other, 0)
    # two brain-extracted images: both as given
    f, m, which = match_extraction(extracted, extracted, model)
    assert which == "" and f is extracted


def test_strip_sets_the_minimum_outside_the_mask_in_every_channel():
    head, _, brain = _phantom()
    two = head.with_data(torch.cat([head.data, 2 * head.data - 1]))
    mask = brain_mask(head, _model())
    out = strip(two, mask)
    inside = mask.data[0].bool()
    for c in range(2):
        assert torch.equal(out.data[c][inside], two.data[c][inside])
        assert torch.all(out.data[c][~inside] == two.data[c].min())


class _Identity:
    """A method that returns the identity (for the wrapper's bookkeeping)."""

    def __init__(self) -> None:
        self.seen: tuple[Image, Image] | None = None
        self.entry, self.options = None, None

    def register(self, fixed, moving, *, prompts=None, seed=0, progress=None):
        self.seen = (fixed, moving)

        def run():
            return AffineTransform.identity(3), None, Extras()

        return measured_result(fixed, moving, run)


def test_the_wrapped_method_sees_the_matched_pair_and_warps_the_given_image(monkeypatch):
    import unireg.methods.extraction.inference as inference

    head, extracted, _ = _phantom()
    model = _model()
    monkeypatch.setattr(inference, "_shipped", lambda device: model)
    inner = _Identity()
    result = ExtractionMatched(inner).register(extracted, head)  # type: ignore[arg-type]
    assert inner.seen is not None and inner.seen[0] is extracted
    assert not torch.equal(inner.seen[1].data, head.data)  # the method saw the stripped head
    assert result.extras.brain_stripped == "moving"
    # the warped image is the given head (identity transform: the head itself)
    assert result.warped is not None
    assert torch.allclose(result.warped.data, head.data, atol=1e-5)
    result = ExtractionMatched(inner).register(head, head)  # type: ignore[arg-type]
    assert result.extras.brain_stripped == ""


def test_the_wrapper_batches_only_for_methods_that_batch(monkeypatch):
    import unireg.methods.extraction.inference as inference

    head, extracted, _ = _phantom()
    monkeypatch.setattr(inference, "_shipped", lambda device: _model())

    class Batching(_Identity):
        def register_many(self, pairs):
            return [self.register(f, m) for f, m in pairs]

    assert not hasattr(ExtractionMatched(_Identity()), "register_many")  # type: ignore[arg-type]
    many = ExtractionMatched(Batching()).register_many([(head, extracted), (head, head)])  # type: ignore[arg-type]
    assert [r.extras.brain_stripped for r in many] == ["fixed", ""]


def test_every_method_has_the_brain_option_and_auto_wraps_it():
    assert options_for("syn").brain == "auto" and options_for("dio").brain == "auto"
    assert isinstance(create("affine-gn"), ExtractionMatched)
    plain = create("affine-gn:brain=off")
    assert not isinstance(plain, ExtractionMatched)
    assert plain.options.to_spec("affine-gn") == "affine-gn:brain=off"


def test_a_missing_or_foreign_model_file_is_named(tmp_path):
    with pytest.raises(UniregError, match="no brain-mask model") as err:
        load_brain_model(tmp_path / "none.pt")
    assert "none.pt" in str(err.value)
    other = save_checkpoint(tmp_path / "kp.pt", "keymorph", BrainMaskNet(3, [2, 2]))
    with pytest.raises(UniregError, match="not a brain-mask one") as err:
        load_brain_model(other)
    assert "kp.pt" in str(err.value)


def test_training_runs_resumes_exactly_and_reloads(tmp_path):
    manifest = _tiny_manifest(tmp_path)

    def config(name: str, steps: int) -> BrainMaskConfig:
        return BrainMaskConfig(
            output=str(tmp_path / name), manifest=str(manifest), datasets=["toy"],
            shape=[16, 16, 16], spacing_mm=3.0, channels=[2, 4], steps=steps,
            checkpoint_every=2, lr=3e-3,
        )  # fmt: skip

    assert_resumes_exactly(BrainMaskTrainer, config, 4)
    model, checkpoint = load_brain_model(tmp_path / "straight" / "last.pt")
    assert isinstance(model, BrainMaskNet) and checkpoint.preprocessing["spacing_mm"] == 3.0
    bad = tmp_path / "bad.toml"
    bad.write_text("channels = [4]\n")
    with pytest.raises(ValueError, match=r"bad.toml.*channels"):
        BrainMaskConfig.from_file(bad)


def test_the_strip_command_writes_the_mask_and_the_stripped_image(tmp_path, capsys):
    import nibabel as nib
    from conftest import write_nifti

    from unireg.cli import main

    head, _, _ = _phantom()
    src = write_nifti(tmp_path / "head.nii.gz", head.data[0].numpy(), AFFINE)
    prep = {"spacing_mm": 4.0, "shape": [24, 24, 24], "center": "mass"}
    model = save_checkpoint(tmp_path / "bm.pt", "brainmask", BrainMaskNet(3, [2, 2]),
                            preprocessing=prep)  # fmt: skip
    mask, out = tmp_path / "o" / "mask.nii.gz", tmp_path / "o" / "brain.nii.gz"
    argv = ["strip", str(src), "--mask", str(mask), "-o", str(out), "--model", str(model)]
    assert main(argv) == 0
    assert "shows more than a brain" in capsys.readouterr().out
    m, b = nib.load(mask), nib.load(out)
    assert np.allclose(m.affine, AFFINE) and m.shape == SHAPE and m.get_data_dtype() == np.uint8
    inside = np.asarray(m.dataobj) > 0
    image = head.data[0].numpy()
    assert np.allclose(np.asarray(b.dataobj)[inside], image[inside], atol=1e-6)
    assert np.all(np.asarray(b.dataobj)[~inside] == image.min())
    # bad settings are refused before anything is written
    fresh = tmp_path / "p" / "mask.nii.gz"
    for bad, message in ((["--threshold", "1.5"], "--threshold"), (["-o", str(fresh)], "same")):
        rc = main(["strip", str(src), "--mask", str(fresh), "--model", str(model), *bad])
        assert rc == 1 and message in capsys.readouterr().err and not fresh.exists()


def test_register_strips_a_head_against_a_brain_extracted_image_with_the_shipped_model(
    tmp_path,
):
    import json

    from conftest import demo_brains

    from unireg.cli import main
    from unireg.evaluation.shifts import Shifted, skullstrip
    from unireg.io.image import save_image

    fixed, moving, fl, ml = demo_brains()
    brain = skullstrip(Shifted(fixed, moving, fl, ml), 0).moving  # zero outside its labels
    paths = {}
    for name, image in (("f", fixed), ("m", brain), ("fl", fl), ("ml", ml)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        save_image(image, paths[name])
    dice = {}
    for mode in ("auto", "off"):
        out = tmp_path / mode
        argv = ["register", str(paths["f"]), str(paths["m"]), "-o", str(out), "--method",
                "affine", "--brain", mode, "--fixed-labels", str(paths["fl"]),
                "--moving-labels", str(paths["ml"]), "--no-hd95", "-q"]  # fmt: skip
        assert main(argv) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["brain_stripped"] == ("fixed" if mode == "auto" else None)
        dice[mode] = metrics["dice_mean"]
    # the head against the brain alone fails (about no registration's 0.07); stripped, the
    # affine solver aligns the brains (0.50 when written)
    assert dice["auto"] > 0.4 and dice["auto"] > dice["off"] + 0.2
