"""SITReg on raw images: an affine stage, then the network on its training grid, its two
fields turned into a world transform and its inverse by the shared pipeline
(:mod:`unireg.methods.pipeline`)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from unireg.io.image import Image, resample
from unireg.methods.base import OptionError
from unireg.methods.pipeline import (
    LearnedMethod,
    check_dimensions,
    linear_and_fields,
    matched_pair,
    network_grid,
    network_input,
)
from unireg.methods.sitreg import INFERENCE, SITRegOptions
from unireg.methods.sitreg.model import SITReg
from unireg.methods.stages import affine_stage
from unireg.profiling import Measure
from unireg.result import RegistrationResult, SITRegExtras
from unireg.solvers.gauss_newton import GN_LEVELS
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
    match_resolution: bool = False,
    device: torch.device | str = "cpu",
    brain: str = "auto",
) -> RegistrationResult:
    """Register raw ``moving`` onto ``fixed`` with a trained ``model`` and its ``checkpoint``
    (:func:`unireg.methods.load_model`).

    With ``match_resolution`` each image is first blurred along its axes to the other's
    resolution where the other's is coarser
    (:func:`~unireg.methods.pipeline.matched_pair`), for steps 1 and 2; the result
    warps the moving image as given.

    1. ``affine`` stage (``"affine-gn"``, the default: Gauss-Newton, same modality;
       ``"affine"``/``"rigid"``: the unireg solver with ``preset``; ``"keymorph"``: the shipped
       KeyMorph model's keypoint affine refined by ``affine-gn``, for heads in any
       orientation, reading the images' brains only with ``brain="auto"``; ``"none"`` for
       pre-aligned pairs): ``A``, fixed world -> moving world (mm).
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
    return register_sitreg_many(
        [(fixed, moving)], model=model, checkpoint=checkpoint, affine=affine, preset=preset,
        inference=inference, match_resolution=match_resolution, device=device, brain=brain,
    )[0]  # fmt: skip


def register_sitreg_many(
    pairs: Sequence[tuple[Image, Image]],
    *,
    model: SITReg,
    checkpoint: Checkpoint,
    affine: str = "affine-gn",
    preset: str = "fast",
    inference: str | None = None,
    match_resolution: bool = False,
    device: torch.device | str = "cpu",
    brain: str = "auto",
) -> list[RegistrationResult]:
    """:func:`register_sitreg` for several ``(fixed, moving)`` pairs, any shapes: each pair's
    affine stage and network grid on their own, then one network pass over all of them (the
    network grid's shape is the model's, so any pairs stack), then each pair's transforms
    and warped image. Each result's time is its own stages plus its share of the pass."""
    if inference is None:
        inference = str(checkpoint.train_config.get("inference", "standard"))
    if inference not in INFERENCE:
        raise OptionError(f"unknown SITReg inference {inference!r}; choose from {INFERENCE}")
    for fixed, moving in pairs:
        check_dimensions(fixed, moving, int(model.config["ndim"]))
    dev = torch.device(device)
    variant: str = inference
    staged = []
    with Measure(dev) as whole:
        for fixed, moving in pairs:
            t0 = time.perf_counter()
            seen_f, seen_m = matched_pair(fixed, moving) if match_resolution else (fixed, moving)
            linear = affine_stage(seen_f, seen_m, affine, preset, dev, STAGE_GN_LEVELS, brain=brain)
            grid = network_grid(checkpoint, fixed)
            a, b = network_input(seen_m, grid, linear), network_input(seen_f, grid)
            staged.append((linear, grid, a, b, time.perf_counter() - t0))
        t1 = time.perf_counter()
        net = model.to(dev).eval()
        with torch.no_grad():
            # a = moving, b = fixed: forward maps fixed's space to moving's; "fast": the
            # fields stay on their coarser grid (held there by the pipeline)
            a_all = torch.cat([s[2] for s in staged]).to(dev)
            b_all = torch.cat([s[3] for s in staged]).to(dev)
            fwd, inv = net(a_all, b_all, inference=variant, resize=False)
        share = (time.perf_counter() - t1) / len(pairs)
        results = []
        for i, ((fixed, moving), (linear, grid, _, _, own)) in enumerate(
            zip(pairs, staged, strict=True)
        ):
            t2 = time.perf_counter()
            # the forward field is evaluated over the fixed field of view, the inverse over
            # the moving one mapped by A^-1
            f, v = fwd[i : i + 1], inv[i : i + 1]
            transform, inverse = linear_and_fields(
                f, v, grid, linear, fixed.geometry, moving.geometry
            )
            warped = resample(moving, fixed.geometry, transform)
            extras = SITRegExtras(
                method=f"sitreg ({variant}, affine stage {affine})",
                matrix=linear.matrix.numpy(), inference=variant, network_grid=grid,
                network_fields=(f.cpu(), v.cpu()),
                stage_seconds={"affine": own, "network": share},
            )  # fmt: skip
            results.append(RegistrationResult(
                transform=transform, fixed=fixed.geometry, moving=moving.geometry,
                inverse=inverse, warped=warped, extras=extras,
                elapsed=own + share + time.perf_counter() - t2,
            ))  # fmt: skip
    for r in results:
        r.peak_memory = whole.peak_bytes
    return results


class SITRegMethod(LearnedMethod):
    """SITReg behind the :class:`~unireg.methods.base.Method` protocol: the model loaded once,
    each pair registered after the options' affine stage."""

    options: SITRegOptions

    def run(self, fixed: Image, moving: Image) -> RegistrationResult:
        return self.register_many([(fixed, moving)])[0]

    def register_many(self, pairs: Sequence[tuple[Image, Image]]) -> list[RegistrationResult]:
        """Several pairs with one network pass (:func:`register_sitreg_many`); what
        ``unireg batch --batch-size`` uses."""
        o = self.options
        assert isinstance(self.model, SITReg)
        return register_sitreg_many(
            pairs, model=self.model, checkpoint=self.checkpoint, affine=o.affine,
            preset=o.preset, inference=o.inference, match_resolution=o.resolution == "match",
            device=self.device, brain=o.brain,
        )  # fmt: skip
