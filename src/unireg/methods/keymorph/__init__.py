"""KeyMorph (Yu et al., MIDL 2022; Wang et al., the TPS extension): a CNN detects ``K``
keypoints in each image; the rigid, affine or thin-plate-spline transform that aligns the fixed
keypoints with the moving ones follows in closed form, differentiably.

- :mod:`.model`: the network (:class:`KeyMorph`) and its closed-form alignments;
- :mod:`.inference`: registering images in world space (:func:`register_keymorph`);
- :mod:`.training`: training from a config (:class:`KeyMorphTrainer`).

This module holds the method's options and registry entry and imports no torch; the names
above load on first use.
"""

from __future__ import annotations

from dataclasses import dataclass

from unireg.methods.base import (
    MethodEntry,
    MethodOptions,
    OptionError,
    lazy_exports,
    model_option,
    option,
    precision_option,
)

TRANSFORMS = ("rigid", "affine", "tps")
# intensity refinements of a keypoint alignment: none, or the Gauss-Newton affine (same
# modality) started from the keypoint affine
REFINEMENTS = ("none", "affine-gn")
# test-time rotations: the keypoints are detected in every rotated copy, mapped back, averaged
DEFAULT_ROTATIONS = 8


def check_refinement(transform: str, refine: str) -> None:
    """An :class:`OptionError` (a ``ValueError``) unless ``refine`` is one of
    :data:`REFINEMENTS` and, when not ``"none"``, ``transform`` is ``"affine"``."""
    if refine not in REFINEMENTS:
        raise OptionError(f"unknown refinement {refine!r}; choose from {REFINEMENTS}")
    if refine != "none" and transform != "affine":
        raise OptionError(f"refine={refine!r} refines an affine alignment, not {transform!r}")


@dataclass(frozen=True)
class KeyMorphOptions(MethodOptions):
    """KeyMorph at inference: which closed form, its lambda, test-time rotations, an optional
    intensity refinement, and the model."""

    method = "keymorph"

    transform: str = option(
        "affine", choices=TRANSFORMS, positional=True,
        help="keymorph: the closed form from the keypoints",
    )  # fmt: skip
    lam: float = option(0.1, flag="--tps-lambda", minimum=0.0, help="keymorph: TPS lambda")
    rotations: int = option(
        DEFAULT_ROTATIONS, minimum=1,
        help="keymorph: test-time rotations; each image's keypoints are averaged over that many "
        "turned copies (1: one detection per image)",
    )  # fmt: skip
    refine: str = option(
        "none", choices=REFINEMENTS,
        help="keymorph (affine): refine the keypoint affine on the intensities with affine-gn "
        "(same modality)",
    )  # fmt: skip
    precision: str = precision_option("keymorph", "the keypoint detectors' convolutions")
    model: str | None = model_option()

    def check(self, where: str = "", method: str = "") -> None:
        try:
            check_refinement(self.transform, self.refine)
        except OptionError as err:
            raise OptionError(f"{where or self.method}: {err}") from err


ENTRY = MethodEntry(
    name="keymorph",
    summary="learned keypoints; closed-form rigid/affine/TPS (writes keypoints.csv)",
    options=KeyMorphOptions,
    factory="unireg.methods.keymorph.inference:KeyMorphMethod",
    prompts=(),
    models={
        "synth": "keymorph_ixi_4mm_upright_synth.pt",
        "upright": "keymorph_ixi_4mm_upright.pt",
        "anatomical": "keymorph_ixi_4mm.pt",
        "decoder": "keymorph_ixi_4mm_decoder.pt",
        "dice": "keymorph_ixi_4mm_dice.pt",
        "selfsup": "keymorph_ixi_4mm_selfsup.pt",
    },
    network="unireg.methods.keymorph.model:KeyMorph.from_config",
    trainer="unireg.methods.keymorph.training:KeyMorphTrainer",
    config="unireg.methods.keymorph.training:KeyMorphConfig",
)
METHODS = (ENTRY,)

__getattr__ = lazy_exports(
    __name__,
    {
        "KeyMorph": "model",
        "KeypointAlignment": "model",
        "KeyMorphMethod": "inference",
        "KeypointCandidates": "inference",
        "choose_pair_keypoints": "inference",
        "detect_keypoints": "inference",
        "keypoint_candidates_many": "inference",
        "moment_turns": "inference",
        "register_keymorph": "inference",
        "rigid_residual": "inference",
        "test_time_rotations": "inference",
        "upright_turn": "inference",
        "write_keypoints_csv": "inference",
        "KeyMorphConfig": "training",
        "KeyMorphTrainer": "training",
    },
)
