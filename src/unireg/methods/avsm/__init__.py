"""AVSM (Shen, Han, Xu, Niethammer: "Networks for Joint Affine and Non-parametric Image
Registration", CVPR 2019): a recurrent multi-step affine network, then a U-Net predicting a
vector momentum whose smoothed velocity (vSVF) is integrated as a map started from the affine
map; the vSVF pass can be applied again to its own result. One forward pass, the moving image
interpolated once.

- :mod:`.model`: the networks and the map integration (:class:`AVSM`);
- :mod:`.inference`: registering raw images in world space (:func:`register_avsm`);
- :mod:`.training`: training from a config, the affine network first, then the vSVF stage
  with the affine network frozen (:class:`AVSMTrainer`).

This module holds the method's options and registry entry and imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from unireg.methods.base import MethodEntry, MethodOptions, lazy_exports, model_option, option
from unireg.methods.solver import AFFINE_STAGES, preset_option

STAGES = ("full", "affine")


@dataclass(frozen=True)
class AVSMOptions(MethodOptions):
    """AVSM at inference: the stage to stop after, the affine network's steps, the vSVF
    passes, and the model."""

    method = "avsm"

    stage: str = option(
        "full", choices=STAGES, positional=True,
        help="avsm: 'affine' stops after the affine network (a world affine); 'full' adds the "
        "vSVF passes (writes inverse_transform.nii.gz)",
    )  # fmt: skip
    affine_steps: int | None = option(
        None, minimum=1,
        help="avsm: recurrent steps of the affine network (default: the steps the model's "
        "vSVF stage was trained after)",
    )  # fmt: skip
    vsvf_steps: int | None = option(
        None, minimum=1,
        help="avsm: vSVF passes, each on the previous result (default: the passes the model "
        "was trained with)",
    )  # fmt: skip
    affine: str = option(
        "none", choices=AFFINE_STAGES, flag="--affine-stage",
        help="avsm: a linear stage on the intensities before the affine network ('none': the "
        "published method; 'rigid' or 'keymorph' for heads turned far from each other); its "
        "map places the moving image's network grid",
    )  # fmt: skip
    preset: str = preset_option()
    model: str | None = model_option()


ENTRY = MethodEntry(
    name="avsm",
    summary="learned multi-step affine then vector-momentum SVF in one forward pass (writes "
    "inverse_transform.nii.gz)",
    options=AVSMOptions,
    factory="unireg.methods.avsm.inference:AVSMMethod",
    models={"standard": "avsm_ixi_2mm.pt"},
    network="unireg.methods.avsm.model:AVSM.from_config",
    trainer="unireg.methods.avsm.training:AVSMTrainer",
    config="unireg.methods.avsm.training:AVSMConfig",
)
METHODS = (ENTRY,)

__getattr__ = lazy_exports(
    __name__,
    {
        "AVSM": "model",
        "AVSMMethod": "inference",
        "register_avsm": "inference",
        "AVSMConfig": "training",
        "AVSMTrainer": "training",
    },
)
