"""The solver as a network layer: register feature maps with :func:`~unireg.solvers.solve` and
pass gradients to the features through the optimum.

The forward solve keeps no graph (it runs on detached features, as many iterations as it
needs). At the optimum ``u*`` of the feature objective ``L(u, F, M)``, the first-order condition
``dL/du = 0`` defines ``u*`` implicitly as a function of the features, so

    du*/dF = -H^-1 d2L/(du dF),   H = d2L/du2.

Like DIO (Jena et al., Jacobian-free implicit gradients), :func:`register_features` replaces
``H^-1`` by a step size ``eta`` times the Gaussian smoothing the dense solver preconditions its
steps with: the output carries the value ``u*`` exactly and the gradient of one solver step at
the optimum, ``u* - eta * G(dL/du)``. Only the dense part is differentiated; a linear stage
before it is held fixed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from unireg.losses import get_loss
from unireg.solvers.solver import LevelFeatures, Stage, solve
from unireg.spatial.field import resize_displacement
from unireg.spatial.filters import gaussian_blur
from unireg.spatial.geometry import Geometry, normalized_map_matrix
from unireg.spatial.grid import (
    channels_last,
    identity_grid,
    transform_points,
    voxel_to_normalized_scale,
)
from unireg.spatial.warp import sample

Features = torch.Tensor | Mapping[float, torch.Tensor]


def dense_objective(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    displacement: torch.Tensor,
    *,
    loss: str = "mse",
    loss_options: Mapping[str, object] | None = None,
    matrix: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The feature objective of a dense map, one value per batch element ``(B,)``.

    Args:
        fixed: features ``(B, C, *shape)``.
        moving: features ``(B, C, *moving_shape)`` on their own grid.
        displacement: normalised displacement ``(B, d, *fixed_shape)`` applied before
            ``matrix``: a fixed point ``x`` is compared with the moving features at
            ``A(x + u(x))``.
        loss: a similarity of :func:`unireg.losses.get_loss`.
        loss_options: its options.
        matrix: normalised fixed -> moving linear maps ``(B, d+1, d+1)`` (default identity).
        mask: fixed-grid weights ``(B, 1, *fixed_shape)``.
    """
    shape = tuple(fixed.shape[2:])
    moved = identity_grid(shape, device=fixed.device, dtype=fixed.dtype)
    moved = moved + channels_last(displacement)  # x + u(x), normalised (B, *shape, d)
    pts = moved if matrix is None else transform_points(matrix.to(fixed), moved)
    warped = sample(moving, pts, padding="border")
    sim = get_loss(loss, **dict(loss_options or {}))
    if mask is None:
        return sim(fixed, warped, reduction="none")
    return sim(fixed, warped, mask=mask, reduction="none")


@dataclass
class LayerResult:
    """What :func:`register_features` returns.

    Attributes:
        displacement: normalised ``(B, d, *fixed_shape)``: the optimum's value, with the
            implicit gradient to the features.
        matrix: world fixed -> moving maps of the linear part ``(B, d+1, d+1)`` float64 (mm).
        trace: per batch element, the solver's per-level trace.
        levels: the dense stage's optimum at the end of each pyramid level, normalised
            ``(B, d, *level_shape)`` by factor, each with the implicit gradient to that
            level's features (the finest equals ``displacement``).
    """

    displacement: torch.Tensor
    matrix: torch.Tensor
    trace: list[list[dict[str, object]]]
    levels: dict[float, torch.Tensor] = field(default_factory=dict)


def _element(x: Features, b: int) -> Features:
    if isinstance(x, Mapping):
        return {k: v[b : b + 1].detach() for k, v in x.items()}
    return x[b : b + 1].detach()


def _full(x: Features) -> torch.Tensor:
    return x[1.0] if isinstance(x, Mapping) else x


def register_features(
    fixed: Features,
    moving: Features,
    stages: Sequence[Stage],
    *,
    fixed_geometry: Geometry | None = None,
    moving_geometry: Geometry | None = None,
    step: float = 1.0,
    seed: int = 0,
) -> LayerResult:
    """Register ``moving`` features onto ``fixed`` features, differentiably.

    Args:
        fixed: ``(B, C, *shape)`` feature tensors, or a mapping from pyramid factor to such
            tensors (factor 1 required), e.g. a network's multi-scale outputs.
        moving: the same for the moving images.
        stages: as for :func:`~unireg.solvers.solve`; the last must be dense.
        fixed_geometry: world placement of the full-resolution fixed grid (one for the whole
            batch; default unit voxels).
        moving_geometry: the same for the moving grid.
        step: ``eta``, the step (voxels per unit gradient) of the implicit gradient.
        seed: seeds the solver.

    Returns:
        :class:`LayerResult`; its ``displacement`` equals the solver's optimum and carries
        ``-eta G(d2L/(du dF))`` as its derivative with respect to the features.
    """
    if not stages or stages[-1].model in ("rigid", "similarity", "affine"):
        raise ValueError("register_features needs a dense stage last")
    ff, mf = _full(fixed), _full(moving)
    if ff.shape[0] != mf.shape[0]:
        raise ValueError("fixed and moving features need the same batch size")
    d = ff.ndim - 2
    fixed_geom = fixed_geometry or Geometry(tuple(ff.shape[2:]), np.eye(d + 1))
    moving_geom = moving_geometry or Geometry(tuple(mf.shape[2:]), np.eye(d + 1))
    fields, matrices, traces = [], [], []
    level_lists: list[list[tuple[float, torch.Tensor]]] = []
    with torch.enable_grad():  # the solver's own steps; the features are detached
        for b in range(ff.shape[0]):
            out = solve(
                _element(fixed, b), _element(moving, b), stages,
                fixed_geometry=fixed_geom, moving_geometry=moving_geom, seed=seed,
            )  # fmt: skip
            assert out.displacement is not None
            fields.append(out.displacement)
            matrices.append(torch.as_tensor(out.matrix, dtype=torch.float64))
            traces.append(out.trace)
            level_lists.append(out.levels)
    u_star = torch.cat(fields).to(ff)
    world = torch.stack(matrices)
    level_stars = {
        factor: torch.cat([t[i][1] for t in level_lists]).to(ff)
        for i, (factor, _) in enumerate(level_lists[0])
    }
    if not (torch.is_grad_enabled() and (ff.requires_grad or mf.requires_grad)):
        return LayerResult(u_star, world, traces, level_stars)
    dense = stages[-1]
    norm = torch.stack([
        torch.as_tensor(normalized_map_matrix(m.numpy(), fixed_geom, moving_geom))
        for m in matrices
    ]).to(ff)  # fmt: skip
    fixed_levels, moving_levels = LevelFeatures(fixed), LevelFeatures(moving)
    levels = {
        factor: implicit_step(
            fixed_levels.at(factor), moving_levels.at(factor), u, dense, norm, step
        )
        for factor, u in level_stars.items()
    }
    finest = levels[min(levels)]
    # the full-resolution field is the finest level's, upsampled when the stage stops coarser
    if tuple(finest.shape[2:]) == tuple(ff.shape[2:]):
        full = finest
    else:
        up = resize_displacement(finest, tuple(ff.shape[2:]))
        full = u_star + (up - up.detach())
    return LayerResult(full, world, traces, levels)


def implicit_step(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    u_star: torch.Tensor,
    stage: Stage,
    matrix: torch.Tensor,
    step: float = 1.0,
) -> torch.Tensor:
    """``u*`` carrying the derivative of one preconditioned solver step at the optimum
    (Jacobian-free backpropagation): the value is ``u*`` exactly, the derivative with respect
    to the features that of ``u* - eta G(dL/du)``, ``G`` the stage's gradient smoothing in
    voxels of ``u*``'s grid.

    Args:
        fixed, moving: features ``(B, C, ...)`` with their graph; ``fixed`` on ``u*``'s grid.
        u_star: the optimum, normalised ``(B, d, *shape)`` (no graph).
        stage: the dense stage (its loss and smoothing).
        matrix: normalised fixed -> moving linear maps ``(B, d+1, d+1)``.
        step: ``eta`` in voxels per unit gradient.
    """
    u = u_star.detach().clone().requires_grad_(True)
    total = dense_objective(
        fixed, moving, u, loss=stage.loss, loss_options=stage.loss_options, matrix=matrix
    )
    (grad,) = torch.autograd.grad(total.sum(), u, create_graph=True)
    # the solver's steps are in voxels, smoothed: the same metric for the implicit step
    scale = voxel_to_normalized_scale(tuple(fixed.shape[2:]), grad)
    grad_vox = grad / scale
    if stage.smooth_gradient > 0:
        grad_vox = gaussian_blur(grad_vox, stage.smooth_gradient)
    stepped = -step * grad_vox * scale
    return u_star.detach() + (stepped - stepped.detach())
