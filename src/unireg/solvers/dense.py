"""Dense transform models on the fixed grid: free-form, greedy diffeomorphic, SVF, B-spline.

Each model is a deformation ``x -> x + u(x)`` of the fixed grid of the current pyramid level,
applied before the linear map (the moving image is pre-warped by the linear map onto the fixed
grid). Parameters are held in voxel units of their grid, so one learning rate means "voxels per
step" at every level; warping converts to normalised units. All models share one interface:

- ``set_level(shape)``: move to a pyramid level (upsampling the current state);
- ``displacement()``: the normalised displacement ``(1, d, *shape)`` of the forward map;
- ``inverse_displacement()``: that of the inverse map, when the model has it by construction;
- ``pair(fixed, moving)``: the two images the similarity compares (``moving`` pre-warped);
- ``map_points(points)``: forward map of normalised points ``(1, N, d)``;
- ``regularization(name)``: ``diffusion`` or ``bending`` energy of the voxel-unit field;
- ``make_optimizer(kind, lr)`` and ``step(optimizer)``: one update after ``backward()``.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

import torch
from torch import nn

from unireg.losses import bending_energy, diffusion
from unireg.solvers.optim import AdamState, Optimizer, make_optimizer
from unireg.spatial.bspline import bspline_field, control_grid_shape
from unireg.spatial.field import compose_displacements, resize_displacement, scaling_and_squaring
from unireg.spatial.filters import central_difference, gaussian_blur
from unireg.spatial.grid import (
    channels_last,
    displacement_to_points,
    voxel_to_normalized_factors,
    voxel_to_normalized_scale,
)
from unireg.spatial.warp import sample, warp


class DenseModel(nn.Module):
    """Base class; see the module docstring for the interface."""

    has_inverse = False

    def __init__(self, ndim: int, *, smooth_gradient: float = 1.0, smooth_field: float = 0.0):
        super().__init__()
        self.ndim = ndim
        self.smooth_gradient = float(smooth_gradient)
        self.smooth_field = float(smooth_field)
        self.shape: tuple[int, ...] | None = None

    @property
    def grid(self) -> tuple[int, ...]:
        """The shape of the current level's grid (after :meth:`set_level`)."""
        if self.shape is None:
            raise RuntimeError("set_level() first")
        return self.shape

    # -- state -------------------------------------------------------------------------------
    def _resized(
        self, field: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor
    ) -> torch.Tensor:
        if field is None:
            return torch.zeros(
                like.shape[0], self.ndim, *shape, dtype=like.dtype, device=like.device
            )
        return resize_displacement(field.detach(), shape, units="voxel")

    def set_level(self, shape: Sequence[int], like: torch.Tensor) -> None:
        raise NotImplementedError

    def voxel_field(self) -> torch.Tensor:
        """The regularised field in voxel units of the level ``(1, d, *shape)``."""
        raise NotImplementedError

    def displacement(self) -> torch.Tensor:
        raise NotImplementedError

    def inverse_displacement(self) -> torch.Tensor | None:
        return None

    # -- objective ---------------------------------------------------------------------------
    def pair(self, fixed: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fixed, warp(moving, self.displacement(), padding="border")

    def map_points(self, points: torch.Tensor) -> torch.Tensor:
        u = sample(self.displacement(), points, mode="linear", padding="border")
        return points + channels_last(u)

    def regularization(self, name: str | None) -> torch.Tensor:
        if name is None:
            return torch.zeros((), device=self.voxel_field().device)
        if name == "diffusion":
            return diffusion(self.voxel_field())
        if name == "bending":
            return bending_energy(self.voxel_field())
        raise ValueError(f"regularizer must be 'diffusion' or 'bending', got {name!r}")

    # -- update ------------------------------------------------------------------------------
    def make_optimizer(self, kind: str, lr: float) -> Optimizer | None:
        return make_optimizer(list(self.parameters()), kind, lr)

    def step(self, optimizer: Optimizer | None) -> None:
        """Smooth the gradient and the optimiser's update (a Sobolev / Riemannian
        preconditioner: Adam's per-voxel normalisation would otherwise turn weak gradients in
        flat regions into full-size noisy steps), then smooth the field when ``smooth_field``
        > 0."""
        assert optimizer is not None
        sigma = self.smooth_gradient
        if sigma > 0:
            for p in self.parameters():
                if p.grad is not None:
                    p.grad = gaussian_blur(p.grad, sigma)
        with torch.no_grad():
            for param, update in optimizer.updates():
                param.add_(gaussian_blur(update, sigma) if sigma > 0 else update)
                if self.smooth_field > 0:
                    param.copy_(gaussian_blur(param, self.smooth_field))


class FreeFormModel(DenseModel):
    """Free-form displacement ``u`` (one vector per voxel), Gaussian-smoothed gradient and
    field (the "elastic" + "fluid" smoothing of demons-type methods). Not invertible in
    general."""

    field: nn.Parameter

    def set_level(self, shape: Sequence[int], like: torch.Tensor) -> None:
        old = None if self.shape is None else self.field
        self.shape = tuple(shape)
        self.field = nn.Parameter(self._resized(old, self.shape, like))

    def voxel_field(self) -> torch.Tensor:
        return self.field

    def displacement(self) -> torch.Tensor:
        return self.field * voxel_to_normalized_scale(self.grid, self.field)

    def pair(self, fixed: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the voxel field scaled and reversed into the sampling points in one pass (what
        # ``warp`` of :meth:`displacement` samples, without the scaled copy)
        points = displacement_to_points(
            self.field, reversed_axes=True, scale=voxel_to_normalized_factors(self.grid)
        )
        return fixed, sample(moving, points, padding="border", reversed_axes=True)


class GreedyModel(DenseModel):
    """Greedy diffeomorphic registration with compositive updates (as SyN's and FireANTs'
    greedy mode): each step's Adam direction ``s`` is smoothed and composed onto the map,
    ``phi <- phi o (id + s)``, with ``|s|`` below ``lr`` voxels per axis and its Jacobian kept
    positive, so every update is a small diffeomorphism and so is the composition.

    The gradient is taken with respect to the update at ``s = 0``, where the warped image is
    ``W(x + s) = W(x) + grad W(x) . s``: it needs the warped image and its finite-difference
    gradient only, not the backward pass of the resampling (the costly part on CPUs)."""

    field: torch.Tensor  # voxel units, updated by composition (not a parameter)
    update: nn.Parameter

    def set_level(self, shape: Sequence[int], like: torch.Tensor) -> None:
        old = None if self.shape is None else self.field
        self.shape = tuple(shape)
        self.field = self._resized(old, self.shape, like)  # voxel units, not a parameter
        self.update = nn.Parameter(torch.zeros_like(self.field))

    def voxel_field(self) -> torch.Tensor:
        return self.field

    def displacement(self) -> torch.Tensor:
        return self.field * voxel_to_normalized_scale(self.grid, self.field)

    def pair(self, fixed: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            warped = warp(moving, self.displacement(), padding="border")
            grads = torch.gradient(warped, dim=tuple(range(2, warped.ndim)))  # per voxel
        linear = warped + sum(g * self.update[:, a : a + 1] for a, g in enumerate(grads))
        return fixed, linear

    def map_points(self, points: torch.Tensor) -> torch.Tensor:
        s = self.update * voxel_to_normalized_scale(self.grid, self.update)
        moved = points + channels_last(sample(s, points, mode="linear", padding="border"))
        return super().map_points(moved)

    def make_optimizer(self, kind: str, lr: float) -> None:
        """Its own compositive optimiser: ``adam`` (FireANTs-style), or ``sgd``: the smoothed
        gradient scaled so its largest vector is ``lr`` voxels (SyN-style gradient step)."""
        if kind not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {kind!r}")
        self.kind, self.lr = kind, float(lr)
        self.adam = AdamState(self.field)
        return None

    def step(self, optimizer: Optimizer | None) -> None:
        g = self.update.grad
        if g is None:
            return
        if self.smooth_gradient > 0:
            g = gaussian_blur(g, self.smooth_gradient)
        with torch.no_grad():
            if self.kind == "sgd":
                peak = g.norm(dim=1).max().clamp_min(1e-12)
                s = -self.lr * g / peak
            else:
                s = self.adam.direction(g, self.lr)
            if self.smooth_gradient > 0:  # smooth the Adam direction (one blur per step)
                s = gaussian_blur(s, self.smooth_gradient)
            # keep id + s a diffeomorphism: every row of its Jacobian's off-identity part sums
            # to at most 1/2 in absolute value, so det(I + grad s) > 0 (diagonal dominance)
            per_axis = [central_difference(s, a).abs().amax(dim=tuple(range(2, s.ndim)))
                        for a in range(self.ndim)]  # fmt: skip
            rows = functools.reduce(operator.add, per_axis)
            s = s * (0.5 / rows.max().clamp_min(0.5))
            scale = voxel_to_normalized_scale(self.grid, s)
            u = compose_displacements(self.field * scale, s * scale) / scale
            if self.smooth_field > 0:
                u = gaussian_blur(u, self.smooth_field)
            self.field = u
            self.update.grad = None


class SVFModel(DenseModel):
    """Stationary velocity field ``v``; the map is ``exp(v)`` by scaling and squaring, so its
    inverse is ``exp(-v)``. Symmetric (default): both images move half-way,
    ``sim(F o exp(-v/2), M o exp(v/2))``, so neither image is privileged."""

    velocity: nn.Parameter

    has_inverse = True

    def __init__(self, ndim: int, *, symmetric: bool = True, steps: int = 7, **kw: float):
        super().__init__(ndim, **kw)
        self.symmetric, self.steps = bool(symmetric), int(steps)

    def set_level(self, shape: Sequence[int], like: torch.Tensor) -> None:
        old = None if self.shape is None else self.velocity
        self.shape = tuple(shape)
        self.velocity = nn.Parameter(self._resized(old, self.shape, like))

    def voxel_field(self) -> torch.Tensor:
        return self.velocity

    def _exp(self, fraction: float) -> torch.Tensor:
        v = self.velocity * voxel_to_normalized_scale(self.grid, self.velocity)
        return scaling_and_squaring(v * fraction, self.steps)

    def displacement(self) -> torch.Tensor:
        return self._exp(1.0)

    def inverse_displacement(self) -> torch.Tensor:
        return self._exp(-1.0)

    def pair(self, fixed: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.symmetric:
            return super().pair(fixed, moving)
        a = warp(fixed, self._exp(-0.5), padding="border")
        b = warp(moving, self._exp(0.5), padding="border")
        return a, b


class BSplineModel(DenseModel):
    """Cubic B-spline free-form deformation: control points every ``control_spacing`` voxels of
    the full-resolution fixed grid, the same control grid at every level (the dense field of
    any level is evaluated exactly from it). Not invertible in general; use ``bending``."""

    def __init__(
        self, ndim: int, full_shape: Sequence[int], control_spacing: float = 4.0, **kw: float
    ):
        super().__init__(ndim, **kw)
        self.full_shape = tuple(full_shape)
        self.control_shape = control_grid_shape(self.full_shape, control_spacing)
        self.control: nn.Parameter | None = None

    def set_level(self, shape: Sequence[int], like: torch.Tensor) -> None:
        self.shape = tuple(shape)
        if self.control is None:
            zeros = torch.zeros(like.shape[0], self.ndim, *self.control_shape, dtype=like.dtype)
            self.control = nn.Parameter(zeros.to(like.device))

    def _control(self) -> nn.Parameter:
        if self.control is None:
            raise RuntimeError("set_level() first")
        return self.control

    def voxel_field(self) -> torch.Tensor:
        # control points are in full-resolution voxels; express them in this level's voxels
        full = voxel_to_normalized_scale(self.full_shape, self._control())
        level = voxel_to_normalized_scale(self.grid, self._control())
        return bspline_field(self._control(), self.grid) * (full / level)

    def displacement(self) -> torch.Tensor:
        full = voxel_to_normalized_scale(self.full_shape, self._control())
        return bspline_field(self._control(), self.grid) * full

    def step(self, optimizer: Optimizer | None) -> None:
        assert optimizer is not None
        optimizer.step()


def dense_model(
    name: str,
    ndim: int,
    full_shape: Sequence[int],
    *,
    smooth_gradient: float = 1.0,
    smooth_field: float = 0.0,
    control_spacing: float = 4.0,
    symmetric: bool = True,
) -> DenseModel:
    """A dense model by name: ``ffd``, ``greedy``, ``svf`` or ``bspline``."""
    kw = {"smooth_gradient": smooth_gradient, "smooth_field": smooth_field}
    if name == "ffd":
        return FreeFormModel(ndim, **kw)
    if name == "greedy":
        return GreedyModel(ndim, **kw)
    if name == "svf":
        return SVFModel(
            ndim, symmetric=symmetric, smooth_gradient=smooth_gradient, smooth_field=smooth_field
        )
    if name == "bspline":
        return BSplineModel(ndim, full_shape, control_spacing, **kw)
    raise ValueError(f"unknown dense model {name!r}; choose ffd, greedy, svf or bspline")
