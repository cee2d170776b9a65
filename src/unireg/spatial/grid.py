"""Point grids and point transforms on tensors (batched, differentiable, any device).

Conventions: points are tensors ``(..., d)`` whose last axis is ordered like the tensor's spatial
axes (axis 0 first). A dense *point map* is ``(B, *spatial, d)``; a *displacement field* is
channel-first ``(B, d, *spatial)``. Both are in normalised coordinates unless a function says
otherwise (see :mod:`unireg.spatial.geometry`).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch


def as_matrix(matrix: np.ndarray | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A homogeneous matrix as a tensor on ``like``'s device and dtype (NumPy is converted)."""
    if isinstance(matrix, np.ndarray):
        matrix = torch.from_numpy(np.ascontiguousarray(matrix))
    return matrix.to(device=like.device, dtype=like.dtype)


def axis_coordinates(
    n: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Normalised coordinates of the ``n`` voxel centres along one axis (0 when ``n == 1``)."""
    if n > 1:
        return torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype)
    return torch.zeros(1, device=device, dtype=dtype)


def identity_grid(
    shape: tuple[int, ...],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Normalised coordinates of every voxel centre of a grid, shape ``(1, *shape, d)``.

    Axes of size 1 get the coordinate 0 (see :func:`voxel_to_normalized_matrix`).
    """
    axes = [axis_coordinates(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).unsqueeze(0)


@functools.lru_cache(maxsize=16)
def _identity_cached(
    shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, reversed_axes: bool
) -> torch.Tensor:
    grid = identity_grid(shape, device=device, dtype=dtype)
    return grid.flip(-1).contiguous() if reversed_axes else grid


def shared_identity_grid(
    shape: tuple[int, ...],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    reversed_axes: bool = False,
) -> torch.Tensor:
    """:func:`identity_grid`, built once per shape, device, dtype and axis order and shared
    by every caller (for the loops that add a displacement to it again and again): read it,
    never write to it. ``reversed_axes``: coordinates in reversed (last axis first) order,
    as ``grid_sample`` takes them."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return _identity_cached(tuple(int(n) for n in shape), dev, dtype, bool(reversed_axes))


def displacement_to_points(
    displacement: torch.Tensor,
    *,
    reversed_axes: bool = False,
    scale: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """Absolute point map ``(B, *spatial, d)`` = identity grid + displacement (normalised
    units). ``reversed_axes``: the coordinates in reversed (last axis first) order, for
    :func:`unireg.spatial.warp.sample` with ``reversed_axes=True``. ``scale``: per-axis
    factors (``d`` floats, tensor-axis order) the displacement is multiplied by first, e.g.
    :func:`voxel_to_normalized_factors` for a field in voxels.

    Either option builds each coordinate in one pass (identity + factor x channel, written
    into the point map: no reversed or scaled copy of the field), differentiably, with a
    second derivative."""
    grid = shared_identity_grid(
        tuple(displacement.shape[2:]), device=displacement.device, dtype=displacement.dtype,
        reversed_axes=reversed_axes,
    )  # fmt: skip
    if not reversed_axes and scale is None:
        return grid + channels_last(displacement)
    d = displacement.shape[1]
    factors = tuple(float(f) for f in scale) if scale is not None else (1.0,) * d
    if len(factors) != d:
        raise ValueError(f"scale needs {d} factors, got {len(factors)}")
    order = tuple(range(d - 1, -1, -1)) if reversed_axes else tuple(range(d))
    out: torch.Tensor = _ChannelsToPoints.apply(displacement, factors, order, grid)  # type: ignore[no-untyped-call]
    return out


def _channels_to_points(
    x: torch.Tensor, factors: tuple[float, ...], order: tuple[int, ...], grid: torch.Tensor | None
) -> torch.Tensor:
    """``out[..., j] = grid[..., j] + factors[order[j]] * x[:, order[j]]`` (no grid: 0)."""
    out = x.new_empty(x.shape[0], *x.shape[2:], len(order))
    for j, k in enumerate(order):
        if grid is None:
            torch.mul(x[:, k], factors[k], out=out[..., j])
        else:
            torch.add(grid[..., j], x[:, k], alpha=factors[k], out=out[..., j])
    return out


def _points_to_channels(
    g: torch.Tensor, factors: tuple[float, ...], order: tuple[int, ...]
) -> torch.Tensor:
    """The adjoint of :func:`_channels_to_points`' linear part: ``out[:, order[j]] =
    factors[order[j]] * g[..., j]``."""
    out = g.new_empty(g.shape[0], len(order), *g.shape[1:-1])
    for j, k in enumerate(order):
        torch.mul(g[..., j], factors[k], out=out[:, k])
    return out


class _ChannelsToPoints(torch.autograd.Function):
    """:func:`_channels_to_points`, differentiable in ``x`` (the grid is a constant); its
    backward is :class:`_PointsToChannels`, so it has every higher derivative."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        factors: tuple[float, ...],
        order: tuple[int, ...],
        grid: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.factors, ctx.order = factors, order
        return _channels_to_points(x, factors, order, grid)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        adjoint = _PointsToChannels.apply(grad, ctx.factors, ctx.order)  # type: ignore[no-untyped-call]
        return adjoint, None, None, None


class _PointsToChannels(torch.autograd.Function):
    """:func:`_points_to_channels`; its backward is :class:`_ChannelsToPoints` without a
    grid."""

    @staticmethod
    def forward(
        ctx: Any, g: torch.Tensor, factors: tuple[float, ...], order: tuple[int, ...]
    ) -> torch.Tensor:
        ctx.factors, ctx.order = factors, order
        return _points_to_channels(g, factors, order)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        adjoint = _ChannelsToPoints.apply(grad, ctx.factors, ctx.order, None)  # type: ignore[no-untyped-call]
        return adjoint, None, None


def voxel_to_normalized_scale(
    shape: tuple[int, ...] | list[int], like: torch.Tensor
) -> torch.Tensor:
    """Per-axis factors ``2 / (n - 1)`` turning voxel displacements into normalised ones
    (1 for an axis of one voxel), shaped ``(1, d, 1, ..., 1)`` to multiply a channel-first
    field; divide by it for normalised -> voxel units."""
    f = voxel_to_normalized_factors(shape)
    return torch.tensor(f, dtype=like.dtype, device=like.device).view(1, -1, *[1] * len(shape))


def voxel_to_normalized_factors(shape: tuple[int, ...] | list[int]) -> tuple[float, ...]:
    """:func:`voxel_to_normalized_scale`'s factors as floats (``scale`` of
    :func:`displacement_to_points`)."""
    return tuple(2.0 / (n - 1) if n > 1 else 1.0 for n in shape)


def voxel_grid(
    shape: tuple[int, ...],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Voxel indices of every voxel centre, shape ``(1, *shape, d)``."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).unsqueeze(0)


def transform_points(matrix: torch.Tensor | np.ndarray, points: torch.Tensor) -> torch.Tensor:
    """Apply homogeneous matrices to points.

    Args:
        matrix: ``(d+1, d+1)`` or batched ``(B, d+1, d+1)``.
        points: ``(..., d)``; with a batched matrix, ``(B, ..., d)`` (B may be 1 on either side).

    Returns:
        transformed points, same frame as the matrix's output frame.
    """
    m = as_matrix(matrix, points)
    d = points.shape[-1]
    if m.shape[-2:] != (d + 1, d + 1):
        raise ValueError(f"matrix {tuple(m.shape)} does not match {d}D points")
    if m.ndim == 2:
        out = points @ m[:d, :d].transpose(0, 1)
        out += m[:d, d]  # in place: one output allocation for the whole grid
        return out
    batch = max(m.shape[0], points.shape[0])
    flat = points.reshape(points.shape[0], -1, d).expand(batch, -1, -1)
    out = flat @ m[:, :d, :d].transpose(1, 2).expand(batch, -1, -1) + m[:, None, :d, d]
    return out.reshape(batch, *points.shape[1:])


def affine_grid(matrix: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Point map of a normalised-frame affine over a grid: ``(B, *shape, d)``.

    ``matrix`` is ``(B, d+1, d+1)`` (or unbatched) mapping fixed normalised coordinates to moving
    normalised coordinates.
    """
    if matrix.ndim == 2:
        matrix = matrix.unsqueeze(0)
    d = len(shape)
    if matrix.shape[-2:] != (d + 1, d + 1):
        raise ValueError(f"matrix {tuple(matrix.shape)} does not match a {d}D grid")
    batch = matrix.shape[0]
    # out = t + sum_a M[:, a] * x_a: one small table per axis, summed by broadcasting, so
    # only the last sum writes a grid-sized tensor
    out: torch.Tensor | None = None
    for a, n in enumerate(shape):
        coords = axis_coordinates(n, device=matrix.device, dtype=matrix.dtype)
        term = coords.view(1, n, 1) * matrix[:, None, :d, a]  # (B, n, d)
        if a == 0:
            term = term + matrix[:, None, :d, d]
        view = [batch] + [1] * d + [d]
        view[1 + a] = n
        term = term.view(view)
        out = term if out is None else out + term
    assert out is not None, "a grid has at least one axis"
    return out.expand(batch, *shape, d).contiguous()


def channels_last(field: torch.Tensor) -> torch.Tensor:
    """``(B, d, *spatial)`` -> ``(B, *spatial, d)``."""
    return field.movedim(1, -1)


def channels_first(points: torch.Tensor) -> torch.Tensor:
    """``(B, *spatial, d)`` -> ``(B, d, *spatial)``."""
    return points.movedim(-1, 1)
