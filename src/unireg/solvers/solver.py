"""The multi-scale iterative solver: stages of transform models optimised coarse to fine.

Works on feature tensors, not just images: ``fixed`` ``(1, C, *fixed_shape)`` and ``moving``
``(1, C, *moving_shape)`` with any number of channels (intensities, or a network's features),
each on its own grid placed in world space by a :class:`~unireg.spatial.Geometry`. Per-level
features may be given directly (a mapping from pyramid factor to tensor), otherwise the
pyramid is built by Gaussian smoothing and resampling.

A solve runs a list of :class:`Stage` s. Linear stages (rigid, similarity, affine) refine one
world matrix; the dense stage (ffd, greedy, svf, bspline) then optimises a deformation of the
fixed grid applied before it: the result maps a fixed point ``x`` to ``A(x + u(x))``.
Extra terms ("prompts": label maps with a soft-Dice term, landmarks with a distance term) are
added to the objective at every level.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch

from unireg.losses import get_loss, one_hot, soft_dice
from unireg.solvers.dense import DenseModel, dense_model
from unireg.solvers.linear import Kind, LinearModel, moments_candidates, search_candidates
from unireg.solvers.optim import Optimizer, make_optimizer
from unireg.solvers.pyramid import downsample, level_geometry
from unireg.spatial.geometry import Geometry, normalized_map_matrix
from unireg.spatial.grid import affine_grid, identity_grid, transform_points
from unireg.spatial.warp import sample

LINEAR = ("rigid", "similarity", "affine")
DENSE = ("ffd", "greedy", "svf", "bspline")


@dataclass
class Level:
    """One pyramid level of a stage: downsampling ``factor`` (1 = full resolution), at most
    ``iterations`` steps, learning rate ``lr`` (the stage's when None)."""

    factor: float
    iterations: int
    lr: float | None = None


def fit_levels(
    levels: Sequence[tuple[float, int]], shape: Sequence[int], min_size: int = 12
) -> list[Level]:
    """Clamp pyramid factors so the coarsest level keeps at least ``min_size`` voxels on its
    shortest axis (small images get fewer, finer levels); merged levels keep the larger
    iteration count."""
    n = min(shape)
    allowed = 1
    while (n - 1) / (allowed * 2) + 1 >= min_size:
        allowed *= 2
    out: list[Level] = []
    for factor, iterations in levels:
        f = min(float(factor), float(allowed))
        if out and out[-1].factor == f:
            out[-1].iterations = max(out[-1].iterations, int(iterations))
        else:
            out.append(Level(f, int(iterations)))
    return out


@dataclass
class Stage:
    """One transform model optimised over its levels (coarse to fine).

    Attributes:
        model: rigid, similarity, affine, ffd, greedy, svf or bspline.
        levels: the schedule.
        loss: similarity name for :func:`unireg.losses.get_loss` (mse, ncc, lncc, mk-lncc, mi).
        loss_options: options bound to it (e.g. ``{"window": 5}``, ``{"bins": 32}``).
        regularizer, regularizer_weight: ``diffusion`` or ``bending`` on the voxel-unit field
            of dense models.
        optimizer, lr: ``adam`` or ``sgd``; learning rate (linear models: radians / fraction
            of the image half-diagonal per step; dense models: voxels per step).
        lr_final: the learning rate falls along a cosine to ``lr * lr_final`` over each level's
            iterations (Adam's steps are about ``lr`` in size, so precision needs the decay).
        tolerance, window: stop a level when the mean loss of the last ``window`` steps
            improves on the ``window`` before by less than ``tolerance`` (relative).
        smooth_gradient, smooth_field: Gaussian sigmas (voxels of the level) for dense models.
        control_spacing: B-spline control spacing in full-resolution fixed voxels.
        symmetric: svf only: both images move half-way; the inverse comes by construction.
        samples: linear stages: compare this many randomly drawn fixed voxels per step
            (seeded) instead of the whole level; for global similarities (mse, ncc, mi).
        init: linear stages: ``"geometry"`` (identity in world space, or the previous
            stage's result), ``"moments"`` (centres of mass and principal axes) or
            ``"search"`` (moments plus a grid of rotations, as ANTs' affine initializer).
        search_step, search_top: rotation grid step (degrees) and how many of the best
            candidates are optimised at the first level before the best one is kept.
        foreground: compare over :func:`solve`'s ``foreground_mask`` (the fixed image's
            foreground) when one is given; ``False``: over the whole grid (a given ``mask``
            applies either way).
    """

    model: str
    levels: Sequence[Level]
    loss: str = "lncc"
    loss_options: dict[str, Any] = field(default_factory=dict)
    regularizer: str | None = None
    regularizer_weight: float = 0.0
    optimizer: str = "adam"
    lr: float = 0.01
    lr_final: float = 0.1
    tolerance: float = 1e-5
    window: int = 10
    smooth_gradient: float = 1.0
    smooth_field: float = 0.0
    control_spacing: float = 4.0
    symmetric: bool = True
    samples: int | None = None
    init: str = "geometry"
    search_step: float = 90.0
    search_top: int = 3
    foreground: bool = True

    def __post_init__(self) -> None:
        if self.model not in LINEAR + DENSE:
            raise ValueError(f"unknown model {self.model!r}; choose from {LINEAR + DENSE}")
        if not self.levels:
            raise ValueError("a stage needs at least one level")
        self.levels = [lv if isinstance(lv, Level) else Level(*lv) for lv in self.levels]
        if self.init not in ("geometry", "moments", "search"):
            raise ValueError(f"init must be geometry, moments or search, got {self.init!r}")


@dataclass
class LabelPrompt:
    """Label maps of both images: adds ``weight * (1 - soft Dice)`` of the warped moving
    one-hot maps (linear interpolation) against the fixed ones. ``labels`` defaults to every
    non-zero value of the fixed map."""

    fixed: torch.Tensor
    moving: torch.Tensor
    weight: float = 1.0
    labels: Sequence[int] | None = None


@dataclass
class LandmarkPrompt:
    """Corresponding points, world mm ``(N, d)``: adds ``weight * mean(|T(x_f) - x_m|^2) /
    scale^2`` (``scale`` in mm)."""

    fixed: torch.Tensor | np.ndarray
    moving: torch.Tensor | np.ndarray
    weight: float = 1.0
    scale: float = 10.0


@dataclass
class SolveResult:
    """What a solve found, fixed -> moving.

    Attributes:
        matrix: world map of the linear part ``(d+1, d+1)`` float64 (mm, fixed -> moving).
        displacement: normalised displacement ``(1, d, *fixed_shape)`` of the dense part
            (applied before ``matrix``), or None.
        inverse_displacement: the dense part's inverse on the fixed grid, when the model has
            it by construction (symmetric svf), or None.
        trace: one dict per stage and level (iterations, losses, seconds, converged).
        levels: the dense stage's normalised displacement at the end of each of its levels,
            ``(factor, (1, d, *level_shape))`` coarse to fine (what a feature network trained
            through every level is scored on).
    """

    matrix: np.ndarray
    displacement: torch.Tensor | None = None
    inverse_displacement: torch.Tensor | None = None
    trace: list[dict[str, Any]] = field(default_factory=list)
    levels: list[tuple[float, torch.Tensor]] = field(default_factory=list)


class LevelFeatures:
    """Per-level features of one image, from a tensor or a {factor: tensor} mapping."""

    def __init__(self, x: torch.Tensor | Mapping[float, torch.Tensor]) -> None:
        if isinstance(x, Mapping):
            self.given = {float(k): v for k, v in x.items()}
            if 1.0 not in self.given:
                raise ValueError("per-level features need the full resolution (factor 1)")
        else:
            self.given = {1.0: x}
        self.cache: dict[float, torch.Tensor] = {}

    @property
    def full(self) -> torch.Tensor:
        return self.given[1.0]

    def at(self, factor: float) -> torch.Tensor:
        """Level ``factor``; even factors are made from level ``factor / 2`` (one cheap
        smoothing and halving per octave instead of a wide filter at full resolution)."""
        f = float(factor)
        if f in self.given:
            return self.given[f]
        if f not in self.cache:
            half = f / 2
            if half >= 1 and half == int(half):
                self.cache[f] = downsample(self.at(half), 2)
            else:
                self.cache[f] = downsample(self.full, f)
        return self.cache[f]


class Objective:
    """The objective of one stage at one pyramid level: similarity + regulariser + prompts.

    :meth:`linear` scores a batch of linear maps, :meth:`dense` a dense model on top of a
    linear map; both return one value per batch element (to minimise)."""

    def __init__(
        self,
        stage: Stage,
        factor: float,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        fixed_geom: Geometry,
        moving_geom: Geometry,
        prompts: Sequence[LabelPrompt | LandmarkPrompt],
        mask: torch.Tensor | None,
        generator: torch.Generator,
    ) -> None:
        opts = dict(stage.loss_options)
        if stage.loss == "mi":
            opts.setdefault("generator", generator)
        self.sim = get_loss(stage.loss, **opts)
        self.stage, self.fixed, self.moving = stage, fixed, moving
        self.generator = generator
        self.fixed_geom, self.moving_geom = fixed_geom, moving_geom
        shape = tuple(fixed.shape[2:])
        self.mask = None
        # masks and label maps on the levels' own grids (the image levels are made octave by
        # octave, whose rounding can differ by a voxel from one resampling of the full grid)
        if mask is not None:
            self.mask = downsample(mask.float(), factor, smooth=False, shape=shape) > 0.5
        self.labels: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        self.landmarks: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        for p in prompts:
            if isinstance(p, LabelPrompt):
                values = p.labels
                if values is None:
                    values = [int(v) for v in torch.unique(p.fixed) if int(v) != 0]
                fo = downsample(one_hot(p.fixed.long(), values).to(fixed.dtype), factor,
                                shape=shape)  # fmt: skip
                mo = downsample(one_hot(p.moving.long(), values).to(fixed.dtype), factor,
                                shape=moving.shape[2:])  # fmt: skip
                self.labels.append((fo, mo, p.weight))
            else:
                xf = torch.as_tensor(np.asarray(p.fixed), dtype=torch.float64)
                xm = torch.as_tensor(np.asarray(p.moving), dtype=torch.float64)
                if xf.shape != xm.shape or xf.ndim != 2 or xf.shape[1] != fixed_geom.ndim:
                    raise ValueError("landmarks must be two (N, d) arrays of the same shape")
                pts = transform_points(fixed_geom.world_to_normalized, xf).to(fixed)
                self.landmarks.append((pts[None], xm.to(fixed.device), p.weight / p.scale**2))
        self.shape = shape
        self._grid: torch.Tensor | None = None
        self._prewarped: tuple[torch.Tensor, list[torch.Tensor]] | None = None

    def _sim(self, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            return self.sim(a, b, reduction="none")
        if self.stage.loss == "mk-lncc":
            raise ValueError("mk-lncc takes no mask; use lncc, ncc, mse or mi with a mask")
        return self.sim(a, b, mask=mask, reduction="none")

    def _landmark_term(self, moving_norm: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        to_world = torch.as_tensor(self.moving_geom.normalized_to_world, device=target.device)
        world = transform_points(to_world, moving_norm.double())
        return ((world - target) ** 2).sum(-1).mean(-1)

    def linear(self, model: LinearModel, *, sampled: bool = True) -> torch.Tensor:
        """Per-candidate objective ``(B,)`` of a batch of linear maps. With the stage's
        ``samples``, only that many fixed voxels (drawn afresh at each call) are mapped and
        compared, as ANTs' metric sampling does; the similarity must then be a global one."""
        mat = model.normalized_matrix(self.fixed.dtype)
        b = model.batch
        n = self.stage.samples
        if sampled and n is not None and n < self.fixed[0, 0].numel():
            idx = torch.randint(self.fixed[0, 0].numel(), (n,), generator=self.generator)
            idx = idx.to(self.fixed.device)
            if self._grid is None:
                grid = identity_grid(self.shape, device=mat.device, dtype=mat.dtype)
                self._grid = grid.reshape(1, -1, len(self.shape))
            pts = transform_points(mat, self._grid[:, idx])[:, :, None]  # (B, n, 1, d)

            def pick(x: torch.Tensor) -> torch.Tensor:
                return x.flatten(2)[:, :, idx, None]  # (B, C, n, 1): a 2D "image" of samples

            mask = None if self.mask is None else pick(self.mask)
        else:
            pts = affine_grid(mat, self.shape)

            def pick(x: torch.Tensor) -> torch.Tensor:
                return x

            mask = self.mask
        fixed = pick(self.fixed)
        total = self._sim(fixed.expand(b, *fixed.shape[1:]), sample(self.moving, pts), mask)
        for fo, mo, w in self.labels:
            f = pick(fo)
            total = total + w * soft_dice(
                f.expand(b, *f.shape[1:]), sample(mo, pts), reduction="none"
            )
        for lm, target, w in self.landmarks:
            moved = transform_points(mat, lm.expand(b, -1, -1))
            total = total + w * self._landmark_term(moved, target).to(total.dtype)
        return total

    def dense(self, model: DenseModel, matrix: torch.Tensor) -> torch.Tensor:
        """Objective of a dense model on top of the fixed linear map ``matrix`` (normalised;
        constant within a level, so the moving features are resampled onto the fixed grid
        through it once per level)."""
        if self._prewarped is None:
            grid = affine_grid(matrix, self.shape)
            with torch.no_grad():
                moving = sample(self.moving, grid, padding="zeros")
                labels = [sample(mo, grid) for _, mo, _ in self.labels]
            self._prewarped = (moving, labels)
        moving, labels = self._prewarped
        a, b = model.pair(self.fixed, moving)
        total = self._sim(a, b, self.mask)
        st = self.stage
        if st.regularizer is not None and st.regularizer_weight > 0:
            total = total + st.regularizer_weight * model.regularization(st.regularizer)
        for (fo, _, w), mo in zip(self.labels, labels, strict=True):
            a, b = model.pair(fo, mo)
            total = total + w * soft_dice(a, b, reduction="none")
        for pts, target, w in self.landmarks:
            moved = transform_points(matrix, model.map_points(pts))
            total = total + w * self._landmark_term(moved, target).to(total.dtype)
        return total


def _converged(losses: list[float], window: int, tolerance: float) -> bool:
    if len(losses) < 2 * window:
        return False
    prev = float(np.mean(losses[-2 * window : -window]))
    last = float(np.mean(losses[-window:]))
    return prev - last < tolerance * max(abs(prev), 1e-12)


def _run_level(
    params_step: Callable[[], torch.Tensor],
    set_lr: Callable[[float], None],
    lr: float,
    iterations: int,
    stage: Stage,
) -> tuple[list[float], bool]:
    losses: list[float] = []
    for it in range(iterations):
        frac = it / max(iterations - 1, 1)
        set_lr(lr * (stage.lr_final + (1 - stage.lr_final) * 0.5 * (1 + math.cos(math.pi * frac))))
        losses.append(float(params_step()))
        if _converged(losses, stage.window, stage.tolerance):
            return losses, True
    return losses, False


@torch.enable_grad()  # the solver differentiates its own objective, even in no_grad code
def solve(
    fixed: torch.Tensor | Mapping[float, torch.Tensor],
    moving: torch.Tensor | Mapping[float, torch.Tensor],
    stages: Sequence[Stage],
    *,
    fixed_geometry: Geometry | None = None,
    moving_geometry: Geometry | None = None,
    init: np.ndarray | None = None,
    prompts: Sequence[LabelPrompt | LandmarkPrompt] = (),
    mask: torch.Tensor | None = None,
    foreground_mask: torch.Tensor | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> SolveResult:
    """Register ``moving`` features onto ``fixed`` features with ``stages``.

    Args:
        fixed: ``(1, C, *shape)`` tensor, or a mapping from pyramid factor to such tensors
            (factor 1 required; missing levels are computed).
        moving: the same for the moving image (same C, its own shape).
        stages: linear stages first, then at most one dense stage.
        fixed_geometry: world placement of the fixed grid (default: unit voxels at the
            origin). Rigid maps are rigid in these world coordinates.
        moving_geometry: the same for the moving grid.
        init: initial world map ``(d+1, d+1)`` (default identity).
        prompts: extra objective terms (label maps, landmarks).
        mask: fixed-grid weights ``(1, 1, *fixed_shape)`` for the similarity.
        foreground_mask: the same for the stages whose ``foreground`` is set, when ``mask``
            is None (e.g. the fixed image's foreground:
            :func:`unireg.solvers.api.foreground_mask`).
        seed: seeds MI's voxel sampling; the same seed gives the same result.
        progress: called with one line per finished level.

    Returns:
        :class:`SolveResult`.
    """
    ff, mf = LevelFeatures(fixed), LevelFeatures(moving)
    d = ff.full.ndim - 2
    fixed_geom = fixed_geometry or Geometry(tuple(ff.full.shape[2:]), np.eye(d + 1))
    moving_geom = moving_geometry or Geometry(tuple(mf.full.shape[2:]), np.eye(d + 1))
    if fixed_geom.shape != tuple(ff.full.shape[2:]) or moving_geom.shape != tuple(
        mf.full.shape[2:]
    ):
        raise ValueError("the geometries do not match the feature shapes")
    if ff.full.shape[1] != mf.full.shape[1]:
        raise ValueError("fixed and moving features need the same number of channels")
    kinds = [s.model in DENSE for s in stages]
    if sum(kinds) > 1 or (any(kinds) and not kinds[-1]):
        raise ValueError("give linear stages first and at most one dense stage, last")
    generator = torch.Generator().manual_seed(int(seed))
    matrix = np.eye(d + 1) if init is None else np.asarray(init, np.float64)
    trace: list[dict[str, Any]] = []
    dense: DenseModel | None = None
    level_fields: list[tuple[float, torch.Tensor]] = []

    def report(
        stage: Stage, lv: Level, shape: tuple[int, ...], losses: list[float], conv: bool, t0: float
    ) -> None:
        entry = {
            "model": stage.model,
            "factor": lv.factor,
            "shape": list(shape),
            "iterations": len(losses),
            "loss_first": losses[0] if losses else float("nan"),
            "loss_last": losses[-1] if losses else float("nan"),
            "converged": conv,
            "seconds": time.perf_counter() - t0,
        }
        trace.append(entry)
        if progress is not None:
            progress(
                f"{stage.model:>10} level 1/{lv.factor:g} {'x'.join(map(str, shape))}: "
                f"{len(losses)} it, loss {entry['loss_first']:.4f} -> {entry['loss_last']:.4f}"
                f"{' (converged)' if conv else ''}, {entry['seconds']:.1f} s"
            )

    def stage_mask(stage: Stage) -> torch.Tensor | None:
        return mask if mask is not None else foreground_mask if stage.foreground else None

    for stage in stages:
        if stage.model in LINEAR:
            lin_mask = stage_mask(stage)
            model: LinearModel | None = None
            for lv in stage.levels:
                t0 = time.perf_counter()
                obj = Objective(
                    stage, lv.factor, ff.at(lv.factor), mf.at(lv.factor),
                    fixed_geom, moving_geom, prompts, lin_mask, generator,
                )  # fmt: skip
                if model is None:
                    # moments from a half-resolution copy: as good, and 8x less work in 3D
                    model = _initial_linear(stage, obj, matrix, ff.at(2), mf.at(2))
                lr = stage.lr if lv.lr is None else lv.lr
                opt = make_optimizer(list(model.parameters()), stage.optimizer, lr)

                def step(
                    model: LinearModel = model, opt: Optimizer = opt, obj: Objective = obj
                ) -> torch.Tensor:
                    opt.zero_grad()
                    per = obj.linear(model)
                    torch.autograd.backward(per.sum())
                    opt.step()
                    best: torch.Tensor = per.detach().min()
                    return best

                losses, conv = _run_level(step, _lr_setter(opt), lr, lv.iterations, stage)
                if model.batch > 1:  # keep the best candidate after the first level
                    with torch.no_grad():
                        best = int(torch.argmin(obj.linear(model, sampled=False)))
                    model = model.select(best)
                report(stage, lv, obj.shape, losses, conv, t0)
            assert model is not None
            # a stage that ends worse than it started (its objective over every voxel of its
            # finest level) keeps its start
            kind = cast(Kind, stage.model)
            start = LinearModel(obj.fixed_geom, obj.moving_geom, kind, init=matrix)
            with torch.no_grad():
                end_loss = float(obj.linear(model, sampled=False)[0])
                start_loss = float(obj.linear(start.to(ff.full.device), sampled=False)[0])
            if _keeps_start(stage, trace[-1], start_loss, end_loss, progress):
                continue
            matrix = model.world_matrix()[0].detach().cpu().numpy()
        else:
            dense = _dense_for(stage, d, tuple(ff.full.shape[2:]))
            for lv in stage.levels:
                t0 = time.perf_counter()
                obj = Objective(
                    stage, lv.factor, ff.at(lv.factor), mf.at(lv.factor),
                    fixed_geom, moving_geom, prompts, stage_mask(stage), generator,
                )  # fmt: skip
                dense.set_level(obj.shape, ff.full)
                norm = torch.as_tensor(
                    normalized_map_matrix(matrix, fixed_geom, moving_geom),
                    dtype=ff.full.dtype, device=ff.full.device,
                )  # fmt: skip
                lr = stage.lr if lv.lr is None else lv.lr
                dopt = dense.make_optimizer(stage.optimizer, lr)

                def dstep(
                    opt: Optimizer | None = dopt,
                    obj: Objective = obj,
                    norm: torch.Tensor = norm,
                    dense: DenseModel = dense,
                ) -> torch.Tensor:
                    if opt is not None:
                        opt.zero_grad()
                    for p in dense.parameters():
                        p.grad = None
                    loss = obj.dense(dense, norm).sum()
                    torch.autograd.backward(loss)
                    dense.step(opt)
                    return loss.detach()

                losses, conv = _run_level(dstep, _lr_setter(dopt, dense), lr, lv.iterations, stage)
                report(stage, lv, obj.shape, losses, conv, t0)
                with torch.no_grad():
                    level_fields.append((float(lv.factor), dense.displacement().detach()))
            # the same rule for the dense stage: against no deformation at its finest level
            start_dense = _dense_for(stage, d, tuple(ff.full.shape[2:]))
            start_dense.set_level(obj.shape, ff.full)
            with torch.no_grad():
                end_loss = float(obj.dense(dense, norm).sum())
                start_loss = float(obj.dense(start_dense, norm).sum())
            if _keeps_start(stage, trace[-1], start_loss, end_loss, progress):
                dense = start_dense
                level_fields = [(f, torch.zeros_like(u)) for f, u in level_fields]
    result = SolveResult(matrix=matrix, trace=trace, levels=level_fields)
    if dense is not None:
        full = tuple(ff.full.shape[2:])
        with torch.no_grad():
            if dense.shape != full:
                dense.set_level(full, ff.full)
            result.displacement = dense.displacement().detach()
            inv = dense.inverse_displacement() if dense.has_inverse else None
            result.inverse_displacement = None if inv is None else inv.detach()
    return result


def _dense_for(stage: Stage, d: int, shape: tuple[int, ...]) -> DenseModel:
    """A stage's dense model at no deformation, on the full-resolution fixed grid."""
    return dense_model(
        stage.model, d, shape,
        smooth_gradient=stage.smooth_gradient, smooth_field=stage.smooth_field,
        control_spacing=stage.control_spacing, symmetric=stage.symmetric,
    )  # fmt: skip


def _keeps_start(
    stage: Stage,
    entry: dict[str, Any],
    start_loss: float,
    end_loss: float,
    progress: Callable[[str], None] | None,
) -> bool:
    """Whether a stage ended worse than it started (its objective over every voxel of its
    finest level), noted in its last trace entry and the progress lines."""
    entry.update(stage_start=start_loss, stage_end=end_loss)
    if start_loss >= end_loss:
        return False
    entry["kept_start"] = True
    if progress is not None:
        progress(f"{stage.model:>10} ended worse than it started "
                 f"({end_loss:.4f} > {start_loss:.4f}): kept its start")  # fmt: skip
    return True


def _lr_setter(opt: Optimizer | None, model: Any = None) -> Callable[[float], None]:
    def set_lr(lr: float) -> None:
        if opt is not None:
            for group in opt.param_groups:
                group["lr"] = lr
        else:
            model.lr = lr  # the greedy model's own compositive Adam

    return set_lr


def _initial_linear(
    stage: Stage, obj: Objective, matrix: np.ndarray, fixed: torch.Tensor, moving: torch.Tensor
) -> LinearModel:
    """The first linear model of a stage: continue ``matrix``, or pick among moment / rotation
    search candidates by their objective at this level."""
    geoms = (obj.fixed_geom, obj.moving_geom)
    kind = cast(Kind, stage.model)
    device = fixed.device
    if stage.init == "geometry":
        return LinearModel(*geoms, kind, init=matrix).to(device)
    f1, m1 = fixed[:, :1], moving[:, :1]  # moments of the first channel
    level_geoms = (
        level_geometry(obj.fixed_geom, tuple(f1.shape[2:])),
        level_geometry(obj.moving_geom, tuple(m1.shape[2:])),
    )
    if stage.init == "moments":
        cands = moments_candidates(f1, m1, *level_geoms)
    else:
        cands = search_candidates(f1, m1, *level_geoms, stage.search_step)
    scores = []
    with torch.no_grad():
        for start in range(0, len(cands), 64):
            chunk = cands[start : start + 64]
            m = LinearModel(*geoms, kind, init=chunk).to(device)
            scores.append(obj.linear(m, sampled=False).double().cpu())
    order = torch.argsort(torch.cat(scores))[: max(int(stage.search_top), 1)]
    return LinearModel(*geoms, kind, init=cands[order]).to(device)
