"""AVSM on raw images: each image on the network's grid placed on its own head, the affine
network's steps, the vSVF passes, and the composed map as a world transform with its inverse
(:mod:`unireg.methods.pipeline`)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from unireg.io.image import Image, resample
from unireg.methods.avsm import STAGES, AVSMOptions
from unireg.methods.avsm.model import AVSM, parameter_frame, to_normalized
from unireg.methods.base import OptionError
from unireg.methods.pipeline import (
    LearnedMethod,
    check_dimensions,
    linear_and_fields,
    network_grid,
    network_input,
)
from unireg.methods.stages import affine_stage
from unireg.profiling import Measure
from unireg.result import AVSMExtras, RegistrationResult
from unireg.spatial.geometry import Geometry, world_map_matrix
from unireg.spatial.transform import AffineTransform, Transform
from unireg.training.checkpoint import Checkpoint

# the affine network's steps at test time for a checkpoint that does not name them (the
# paper's 7); a trained model's are the steps its vSVF stage was trained after
TEST_AFFINE_STEPS = 7


def register_avsm(
    fixed: Image,
    moving: Image,
    *,
    model: AVSM,
    checkpoint: Checkpoint,
    stage: str = "full",
    affine_steps: int | None = None,
    vsvf_steps: int | None = None,
    affine: str = "none",
    preset: str = "fast",
    device: torch.device | str = "cpu",
    brain: str = "auto",
) -> RegistrationResult:
    """Register raw ``moving`` onto ``fixed`` with a trained ``model`` and its ``checkpoint``.

    1. Each image on the network's grid ``G`` (its training spacing and shape, RAS axes)
       centred on its own head's centre of mass, intensities in [0, 1]. With a linear stage
       first (``affine``: ``rigid``, ``affine``, ``affine-gn`` or ``keymorph``, with
       ``preset`` and ``brain``; see :func:`unireg.methods.stages.affine_stage`), the moving
       image's grid is instead the fixed grid carried into it by that stage's map ``P``, so
       the network sees the moving head turned onto the fixed one, and ``A`` below includes
       ``P``.
    2. ``affine_steps`` recurrent affine steps (default: the steps the model's vSVF stage
       was trained after, ``affine_test_steps``; 7 when the checkpoint does not say): ``A``, a
       world affine (fixed world -> moving world, mm), written as the transform when
       ``stage="affine"``.
    3. ``vsvf_steps`` vSVF passes (default: the model's training passes), each advecting the
       map on the fixed grid at half resolution: ``psi``.

    The result's ``transform`` is ``x -> A(x + u(x))`` (``u``: ``psi``'s displacement in
    world mm, held on its half-resolution grid over ``G`` and extended beyond it by its face
    values); its ``inverse`` is ``y -> z + w(z)``, ``z = A^-1(y)``, ``w`` the displacement of
    ``psi^-1`` (each pass's ``-v`` integrated and composed in reverse order).
    """
    return register_avsm_many(
        [(fixed, moving)], model=model, checkpoint=checkpoint, stage=stage,
        affine_steps=affine_steps, vsvf_steps=vsvf_steps, affine=affine, preset=preset,
        device=device, brain=brain,
    )[0]  # fmt: skip


def register_avsm_many(
    pairs: Sequence[tuple[Image, Image]],
    *,
    model: AVSM,
    checkpoint: Checkpoint,
    stage: str = "full",
    affine_steps: int | None = None,
    vsvf_steps: int | None = None,
    affine: str = "none",
    preset: str = "fast",
    device: torch.device | str = "cpu",
    brain: str = "auto",
) -> list[RegistrationResult]:
    """:func:`register_avsm` for several ``(fixed, moving)`` pairs with one network pass:
    every image on the network's grid (the model's shape and spacing, so any pairs stack),
    one forward pass of the stacked pairs, then each pair's transforms and warped image.
    Each result's time is its own stages plus its share of the pass."""
    if stage not in STAGES:
        raise OptionError(f"unknown AVSM stage {stage!r}; choose from {STAGES}")
    for fixed, moving in pairs:
        check_dimensions(fixed, moving, int(model.config["ndim"]))
    dev = torch.device(device)
    train = checkpoint.train_config
    default_affine = int(train.get("affine_test_steps", TEST_AFFINE_STEPS))
    n_affine = default_affine if affine_steps is None else int(affine_steps)
    trained = int(train.get("vsvf_steps", 2))
    n_vsvf = 0 if stage == "affine" else (trained if vsvf_steps is None else int(vsvf_steps))
    staged = []
    with Measure(dev) as whole:
        for fixed, moving in pairs:
            t0 = time.perf_counter()
            grid_f = network_grid(checkpoint, fixed)
            if affine == "none":
                grid_m = network_grid(checkpoint, moving)
            else:  # the fixed grid carried into the moving image by the linear stage's map
                pre = affine_stage(fixed, moving, affine, preset, dev, brain=brain)
                grid_m = Geometry(grid_f.shape, pre.matrix.double().numpy() @ grid_f.affine)
            xf, xm = network_input(fixed, grid_f), network_input(moving, grid_m)
            d = fixed.ndim
            # the parameter frame: the network grid's axes and spacing, the same for every
            # image (only the grid's centre follows the head)
            frame = parameter_frame(
                torch.from_numpy(grid_f.normalized_to_world[:d, :d]).float(),
                float(model.config["length_mm"]),
            ).to(dev)
            staged.append((grid_f, grid_m, xf, xm, frame, time.perf_counter() - t0))
        frame = staged[0][4]
        if any(not torch.allclose(s[4], frame) for s in staged):
            raise ValueError("the pairs' network grids differ in axes or spacing")
        t1 = time.perf_counter()
        net = model.to(dev).eval()
        with torch.no_grad():
            xm_all = torch.cat([s[3] for s in staged]).to(dev)
            xf_all = torch.cat([s[2] for s in staged]).to(dev)
            out = net(xm_all, xf_all, frame, affine_steps=n_affine, vsvf_steps=n_vsvf,
                      inverse=True)  # fmt: skip
        share = (time.perf_counter() - t1) / len(pairs)
        results = []
        for i, ((fixed, moving), (grid_f, grid_m, _, _, _, own)) in enumerate(
            zip(pairs, staged, strict=True)
        ):
            t2 = time.perf_counter()
            normalized = to_normalized(out["matrix"][i].double(), frame.double()).cpu().numpy()
            linear = AffineTransform(world_map_matrix(normalized, grid_f, grid_m))
            fields = None
            if n_vsvf == 0:
                transform: Transform = linear
                inverse: Transform = linear.inverse()
            else:
                fwd, inv = out["displacement"][i : i + 1], out["inverse"][i : i + 1]
                transform, inverse = linear_and_fields(
                    fwd, inv, grid_f, linear, fixed.geometry, moving.geometry
                )
                fields = (fwd.cpu(), inv.cpu())
            warped = resample(moving, fixed.geometry, transform)
            t3 = time.perf_counter()
            extras = AVSMExtras(
                method=f"avsm ({stage}: {n_affine} affine steps, {n_vsvf} vSVF passes"
                + ("" if affine == "none" else f", after {affine}") + ")",
                matrix=linear.matrix.numpy(), stage=stage, affine_steps=n_affine,
                vsvf_steps=n_vsvf, network_grids=(grid_f, grid_m), network_fields=fields,
                stage_seconds={"inputs": own, "network": share, "transform": t3 - t2},
            )  # fmt: skip
            results.append(RegistrationResult(
                transform=transform, fixed=fixed.geometry, moving=moving.geometry,
                inverse=inverse, warped=warped, extras=extras, elapsed=own + share + t3 - t2,
            ))  # fmt: skip
    for r in results:
        r.peak_memory = whole.peak_bytes
    return results


class AVSMMethod(LearnedMethod):
    """AVSM behind the :class:`~unireg.methods.base.Method` protocol: the model loaded once,
    each pair registered with the options' stage and steps."""

    options: AVSMOptions

    def run(self, fixed: Image, moving: Image) -> RegistrationResult:
        o = self.options
        assert isinstance(self.model, AVSM)
        return register_avsm(
            fixed, moving, model=self.model, checkpoint=self.checkpoint, stage=o.stage,
            affine_steps=o.affine_steps, vsvf_steps=o.vsvf_steps, affine=o.affine,
            preset=o.preset, device=self.device, brain=o.brain,
        )  # fmt: skip

    def register_many(self, pairs: Sequence[tuple[Image, Image]]) -> list[RegistrationResult]:
        """Several pairs with one network pass (:func:`register_avsm_many`); what
        ``unireg batch --batch-size`` uses."""
        o = self.options
        assert isinstance(self.model, AVSM)
        return register_avsm_many(
            pairs, model=self.model, checkpoint=self.checkpoint, stage=o.stage,
            affine_steps=o.affine_steps, vsvf_steps=o.vsvf_steps, affine=o.affine,
            preset=o.preset, device=self.device, brain=o.brain,
        )  # fmt: skip
