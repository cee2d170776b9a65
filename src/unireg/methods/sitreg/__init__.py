"""SITReg (Honkamaa & Marttinen, MELBA 2024): a multi-resolution network that is symmetric,
inverse-consistent and topology-preserving by construction.

- :mod:`.model`: the network (:class:`SITReg`), its bounded B-spline updates and the
  symmetric update;
- :mod:`.inference`: registering raw images in world space after an affine stage
  (:func:`register_sitreg`);
- :mod:`.training`: training from a config (:class:`SITRegTrainer`).

This module holds the method's options and registry entry and imports no torch; the names
above load on first use.
"""

from __future__ import annotations

from dataclasses import dataclass

from unireg.methods.base import (
    MethodEntry,
    MethodOptions,
    lazy_exports,
    model_option,
    option,
    resolution_option,
)
from unireg.methods.solver import affine_stage_option, preset_option

INFERENCE = ("standard", "complete", "fast")


@dataclass(frozen=True)
class SITRegOptions(MethodOptions):
    """SITReg at inference: the inference variant, the affine stage run first, the solver
    preset of that stage, and the model."""

    method = "sitreg"

    inference: str | None = option(
        None, choices=INFERENCE, positional=True,
        help="sitreg: 'complete' evaluates every update on the full grid (slower, closer "
        "inverse); 'fast' keeps the finest update on its own half-resolution grid (default: "
        "the one the model was trained with)",
    )  # fmt: skip
    resolution: str = resolution_option("sitreg")
    affine: str = affine_stage_option()
    preset: str = preset_option()
    model: str | None = model_option()


ENTRY = MethodEntry(
    name="sitreg",
    summary="learned symmetric, inverse-consistent deformation after an affine stage "
    "(writes inverse_transform.nii.gz)",
    options=SITRegOptions,
    factory="unireg.methods.sitreg.inference:SITRegMethod",
    models={
        "synth": "sitreg_lite_synth_2mm.pt",
        "lite": "sitreg_lite_ixi_2mm.pt",
        "standard": "sitreg_ixi_2mm.pt",
    },
    network="unireg.methods.sitreg.model:SITReg.from_config",
    trainer="unireg.methods.sitreg.training:SITRegTrainer",
    config="unireg.methods.sitreg.training:SITRegConfig",
)
METHODS = (ENTRY,)

__getattr__ = lazy_exports(
    __name__,
    {
        "BoundedBSplineUpdate": "model",
        "SITReg": "model",
        "symmetric_update": "model",
        "SITRegMethod": "inference",
        "STAGE_GN_LEVELS": "inference",
        "register_sitreg": "inference",
        "SITRegConfig": "training",
        "SITRegTrainer": "training",
    },
)
