"""The linear stage a learned method runs on the intensities before its network or solver
(``--affine-stage``): one implementation for SITReg and DIO."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from unireg.io.image import Image
from unireg.methods.base import OptionError
from unireg.methods.solver import AFFINE_STAGES
from unireg.spatial.transform import AffineTransform
from unireg.training.checkpoint import Checkpoint


def affine_stage(
    fixed: Image,
    moving: Image,
    affine: str,
    preset: str,
    device: torch.device,
    gn_levels: Mapping[str, Any] | None = None,
    brain: str = "auto",
) -> AffineTransform:
    """``A``, fixed world -> moving world (mm), by the linear stage a learned method runs
    first (:data:`unireg.methods.solver.AFFINE_STAGES`): ``"affine-gn"`` (Gauss-Newton, same
    modality; its schedule ``gn_levels[preset]``, default
    :data:`~unireg.solvers.gauss_newton.GN_LEVELS`; redone by the solver's ``affine`` with
    mutual information when the pair it aligned correlates below
    :data:`~unireg.solvers.api.CONTRAST_R`, two contrasts), ``"affine"``/``"rigid"`` (the
    solver with ``preset``), ``"keymorph"`` (the shipped KeyMorph model's keypoint affine
    refined by affine-gn, for heads in any orientation) or ``"none"`` (identity)."""
    from unireg.solvers import register
    from unireg.solvers.api import CONTRAST_R, contrast_correlation
    from unireg.solvers.gauss_newton import GN_LEVELS, affine_gauss_newton

    if affine not in AFFINE_STAGES:
        raise OptionError(f"unknown affine stage {affine!r}; choose from {AFFINE_STAGES}")
    if affine == "none":
        return AffineTransform.identity(fixed.ndim)
    if affine == "keymorph":
        return _keymorph_stage(fixed, moving, device, brain)
    if affine == "affine-gn":
        levels = (gn_levels or GN_LEVELS)[preset]
        linear, _ = affine_gauss_newton(fixed, moving, levels=levels, device=device)
        # affine-gn matches local intensities, one contrast: when the images it aligned do not
        # look like one (the solvers' test), mutual information decides instead
        if contrast_correlation(fixed, moving, linear.matrix.numpy()) < CONTRAST_R:
            linear = register(fixed, moving, "affine", preset=preset, multimodal=True,
                              device=device).transform  # fmt: skip
            assert isinstance(linear, AffineTransform)
        return linear
    stage = register(fixed, moving, affine, preset=preset, device=device)
    assert isinstance(stage.transform, AffineTransform)
    return stage.transform


@functools.lru_cache(maxsize=2)
def _shipped_keymorph(device: torch.device) -> tuple[torch.nn.Module, Checkpoint]:
    """The shipped KeyMorph model, loaded once per device (inference only)."""
    from unireg.methods.registry import load_model

    return load_model("keymorph", device=device)


def _keymorph_stage(
    fixed: Image, moving: Image, device: torch.device, brain: str = "auto"
) -> AffineTransform:
    """The ``"keymorph"`` stage: the shipped KeyMorph model's keypoint affine (one detection
    per image), refined by ``affine-gn``."""
    from unireg.methods.keymorph.inference import register_keymorph
    from unireg.methods.keymorph.model import KeyMorph

    model, checkpoint = _shipped_keymorph(device)
    assert isinstance(model, KeyMorph)
    result = register_keymorph(
        fixed, moving, model=model, checkpoint=checkpoint, transform="affine",
        refine="affine-gn", rotations=1, device=device, brain=brain,
    )  # fmt: skip
    assert isinstance(result.transform, AffineTransform)
    return result.transform
