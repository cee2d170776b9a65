"""SITReg on raw images: an affine stage, then the network on its training grid, its two
fields turned into a world transform and its inverse by the shared pipeline
(:mod:`unireg.methods.pipeline`)."""

from __future__ import annotations

import time

import torch

from unireg.io.image import Image
from unireg.methods.base import OptionError
from unireg.methods.pipeline import (
    LearnedMethod,
    check_dimensions,
    linear_and_fields,
    network_grid,
    network_input,
)
from unireg.methods.sitreg import INFERENCE, SITRegOptions
from unireg.methods.sitreg.model import SITReg
from unireg.methods.stages import affine_stage
from unireg.result import RegistrationResult, SITRegExtras, measured_result
from unireg.solvers.gauss_newton import GN_LEVELS
from unireg.spatial.transform import Transform
from unireg.training.checkpoint import Checkpoint

# affine-gn as SITReg's stage: the "fast" schedule stops the finest level after 3 iterations
# (the network takes up what is left). Chosen on 10 IXI training pairs: Dice after the lite
# network 0.6113 against 0.6114 with affine-gn's own 5, for 12 ms less per pair.
STAGE_GN_LEVELS = {**GN_LEVELS, "fast": ((8.0, 10), (4.0, 8), (2.0, 3))}


def register_sitreg(
    fixed: Image,
    moving: Image,
    *,
    model: SITReg,
    checkpoint: Checkpoint,
    affine: str = "affine-gn",
    preset: str = "fast",
    inference: str | None = None,
    device: torch.device | str = "cpu",
) -> RegistrationResult:
    """Register raw ``moving`` onto ``fixed`` with a trained ``model`` and its ``checkpoint``
    (:func:`unireg.methods.load_model`).

    1. ``affine`` stage (``"affine-gn"``, the default: Gauss-Newton, same modality;
       ``"affine"``/``"rigid"``: the unireg solver with ``preset``; ``"keymorph"``: the shipped
       KeyMorph model's keypoint affine refined by ``affine-gn``, for heads in any
       orientation; ``"none"`` for pre-aligned pairs): ``A``, fixed world -> moving world
       (mm).
    2. Both images on the network's training grid ``G`` (its spacing and shape, centred on the
       fixed image's centre of mass, RAS axes): the fixed image resampled, the moving one
       resampled through ``A``; intensities rescaled to [0, 1].
    3. One network pass gives both directions on ``G`` (``inference``: one of
       :data:`INFERENCE`; by default the one the model was trained with).

    The result's ``transform`` is ``x -> A(x + u(x))`` (``u`` the forward field in world mm,
    held on the network's own grid over ``G`` and extended beyond it by its values at ``G``'s
    faces), its ``inverse`` ``y -> z + v(z)``, ``z = A^-1(y)``; both are written by
    :meth:`RegistrationResult.save` as one displacement field each, on the fixed and the
    moving grid. ``extras`` (:class:`~unireg.result.SITRegExtras`) hold the matrix of ``A``,
    ``G``, the network's own fields and the time of each stage (seconds); the measured time
    includes the warped image.
    """
    if inference is None:
        inference = str(checkpoint.train_config.get("inference", "standard"))
    if inference not in INFERENCE:
        raise OptionError(f"unknown SITReg inference {inference!r}; choose from {INFERENCE}")
    check_dimensions(fixed, moving, int(model.config["ndim"]))
    dev = torch.device(device)
    variant: str = inference

    def run() -> tuple[Transform, Transform | None, SITRegExtras]:
        t0 = time.perf_counter()
        linear = affine_stage(fixed, moving, affine, preset, dev, STAGE_GN_LEVELS)
        t1 = time.perf_counter()
        grid = network_grid(checkpoint, fixed)
        net = model.to(dev).eval()
        with torch.no_grad():
            # a = moving, b = fixed: forward maps fixed's space to moving's; "fast": the
            # fields stay on their coarser grid (held there by the pipeline)
            fwd, inv = net(
                network_input(moving, grid, linear).to(dev), network_input(fixed, grid).to(dev),
                inference=variant, resize=False,
            )  # fmt: skip
        # the forward field is evaluated over the fixed field of view, the inverse over the
        # moving one mapped by A^-1
        transform, inverse = linear_and_fields(
            fwd, inv, grid, linear, fixed.geometry, moving.geometry
        )
        t2 = time.perf_counter()
        extras = SITRegExtras(
            method=f"sitreg ({variant}, affine stage {affine})", matrix=linear.matrix.numpy(),
            inference=variant, network_grid=grid, network_fields=(fwd.cpu(), inv.cpu()),
            stage_seconds={"affine": t1 - t0, "network": t2 - t1},
        )  # fmt: skip
        return transform, inverse, extras

    return measured_result(fixed, moving, run, dev)


class SITRegMethod(LearnedMethod):
    """SITReg behind the :class:`~unireg.methods.base.Method` protocol: the model loaded once,
    each pair registered after the options' affine stage."""

    options: SITRegOptions

    def run(self, fixed: Image, moving: Image) -> RegistrationResult:
        o = self.options
        assert isinstance(self.model, SITReg)
        return register_sitreg(
            fixed, moving, model=self.model, checkpoint=self.checkpoint, affine=o.affine,
            preset=o.preset, inference=o.inference, device=self.device,
        )  # fmt: skip
