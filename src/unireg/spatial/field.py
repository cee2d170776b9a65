"""Dense displacement fields: composition, resizing, absolute grids, world conversion,
Jacobian determinants and integration of stationary velocity fields.

A displacement field ``u`` is ``(B, d, *spatial)`` on the fixed grid, channel ``a`` being the
displacement along tensor axis ``a``, in normalised units unless a function says otherwise; it
stands for the point map ``T(x) = x + u(x)`` (fixed -> moving).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from unireg.spatial.geometry import Geometry, normalized_to_voxel_matrix
from unireg.spatial.grid import (
    as_matrix,
    channels_first,
    channels_last,
    displacement_to_points,
    identity_grid,
    shared_identity_grid,
    transform_points,
)
from unireg.spatial.warp import Padding, sample


def points_to_displacement(points: torch.Tensor) -> torch.Tensor:
    """Displacement ``(B, d, *spatial)`` of a normalised point map ``(B, *spatial, d)``."""
    grid = shared_identity_grid(tuple(points.shape[1:-1]), device=points.device, dtype=points.dtype)
    return channels_first(points - grid)


def compose_displacements(
    outer: torch.Tensor, inner: torch.Tensor, *, padding: Padding = "border"
) -> torch.Tensor:
    """Displacement of ``x -> outer(inner(x))``: ``inner(x) + outer(x + inner(x))``.

    Warping an image by ``outer`` and then warping the result by ``inner`` equals warping it
    once by the composition (up to interpolation). ``outer`` is sampled with linear
    interpolation and ``padding`` (default: constant extension at the border).
    """
    points = displacement_to_points(inner, reversed_axes=True)
    return inner + sample(outer, points, mode="linear", padding=padding, reversed_axes=True)


def resize_displacement(
    displacement: torch.Tensor,
    shape: tuple[int, ...],
    *,
    units: Literal["normalized", "voxel"] = "normalized",
) -> torch.Tensor:
    """Resample a displacement field onto a grid of another resolution over the same extent.

    Normalised displacements keep their values (the frame is resolution-free); voxel-unit
    displacements are rescaled by ``(n_new - 1) / (n_old - 1)`` per axis.
    """
    d = displacement.shape[1]
    mode = "bilinear" if d == 2 else "trilinear"
    out = F.interpolate(displacement, size=tuple(shape), mode=mode, align_corners=True)
    if units == "voxel":
        old = displacement.shape[2:]
        factors = [
            (n - 1) / (o - 1) if o > 1 and n > 1 else 1.0 for n, o in zip(shape, old, strict=True)
        ]
        out = out * torch.tensor(factors, dtype=out.dtype, device=out.device).view(1, d, *[1] * d)
    elif units != "normalized":
        raise ValueError(f"units must be 'normalized' or 'voxel', got {units!r}")
    return out


def displacement_to_world(
    displacement: torch.Tensor, fixed: Geometry, moving: Geometry
) -> torch.Tensor:
    """World-mm displacement on the fixed grid: ``world_m(x + u(x)) - world_f(x)``.

    Input is a normalised displacement (fixed normalised -> moving normalised); output is
    ``(B, d, *fixed_spatial)`` in the world frame of the geometries (RAS+ mm for NIfTI).
    """
    points = displacement_to_points(displacement)
    moving_world = transform_points(moving.normalized_to_world, points)
    fixed_world = world_points(fixed, device=points.device, dtype=points.dtype)
    return channels_first(moving_world - fixed_world)


def displacement_from_world(
    displacement: torch.Tensor, fixed: Geometry, moving: Geometry
) -> torch.Tensor:
    """Inverse of :func:`displacement_to_world`: world-mm field -> normalised displacement."""
    fixed_world = world_points(fixed, device=displacement.device, dtype=displacement.dtype)
    points = transform_points(moving.world_to_normalized, fixed_world + channels_last(displacement))
    return points_to_displacement(points)


def jacobian_determinant(
    displacement: torch.Tensor, *, moving_shape: tuple[int, ...] | None = None
) -> torch.Tensor:
    """Jacobian determinant of ``x -> x + u(x)`` in voxel units, ``(B, *spatial)``.

    The map is taken from fixed voxel indices to moving voxel indices (``moving_shape`` defaults
    to the fixed shape), so an identity gives 1 and a value <= 0 marks folding. Derivatives are
    central differences inside and one-sided at the border (``torch.gradient``); for an affine
    map the result is its matrix determinant everywhere. Differentiable.
    """
    fixed_shape = tuple(displacement.shape[2:])
    moving_shape = fixed_shape if moving_shape is None else tuple(moving_shape)
    # voxel-unit point map: moving voxel index of each fixed voxel
    points = transform_points(
        as_matrix(normalized_to_voxel_matrix(moving_shape), displacement),
        displacement_to_points(displacement),
    )
    return point_map_jacobian_determinant(points)


def point_map_jacobian_determinant(points: torch.Tensor) -> torch.Tensor:
    """Determinant of the derivative of a point map ``(B, *spatial, d)`` with respect to the
    voxel indices of its grid: ``(B, *spatial)``. Central differences inside, one-sided at the
    border (``torch.gradient``). Divide by the determinant of the grid's voxel-to-world matrix
    to get the Jacobian with respect to world coordinates."""
    d = points.shape[-1]
    grads = torch.gradient(points, dim=tuple(range(1, d + 1)))  # d tensors (B, *S, d)
    jac = torch.stack(grads, dim=-1)  # (B, *S, d_out, d_in)
    return small_determinant(jac)


def small_determinant(m: torch.Tensor) -> torch.Tensor:
    """Determinants of a batch of 2x2 or 3x3 matrices ``(..., d, d)`` by the explicit
    formula: elementwise, several times faster than an LU per voxel."""
    d = m.shape[-1]
    if m.shape[-2] != d or d not in (2, 3):
        raise ValueError(f"expected (..., 2, 2) or (..., 3, 3) matrices, got {tuple(m.shape)}")
    return _determinant_of_entries(m.movedim((-2, -1), (0, 1)))


def _determinant_of_entries(m: torch.Tensor | Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """:func:`small_determinant` of matrices held entry-first, ``m[i][j]`` a tensor ``(...)``
    (a ``(d, d, ...)`` tensor or nested lists): fastest when each entry is contiguous."""
    if len(m) == 2:
        return m[0][0] * m[1][1] - m[0][1] * m[1][0]
    a, b, c = m[0][0], m[0][1], m[0][2]
    e, f, g = m[1][0], m[1][1], m[1][2]
    h, i, j = m[2][0], m[2][1], m[2][2]
    return a * (f * j - g * i) - b * (e * j - g * h) + c * (e * i - f * h)


def displacement_jacobian_determinant(
    displacement: torch.Tensor, geometry: Geometry
) -> torch.Tensor:
    """Jacobian determinant, with respect to world coordinates (mm/mm), of the world map
    ``x -> x + u(x)`` given by its displacement ``u`` (mm, ``(d, *geometry.shape)``) on the
    voxels of ``geometry``: 1 keeps volume, <= 0 is folding. ``(*geometry.shape)``.

    The same differences as :func:`point_map_jacobian_determinant` of the points ``x + u``
    (central inside, one-sided at the border; exact for the linear ``x`` part), taken on ``u``
    alone, so single precision loses nothing to the size of the world coordinates."""
    d = geometry.ndim
    if tuple(displacement.shape) != (d, *geometry.shape):
        raise ValueError(
            f"displacement of shape {tuple(displacement.shape)} is not (d, *{geometry.shape})"
        )
    linear = np.asarray(geometry.affine, dtype=np.float64)[:d, :d]  # voxel -> world (mm)
    grads = torch.gradient(displacement, dim=tuple(range(1, d + 1)))  # du/di_k, (d, *S) each
    # entry (o, k) of the voxel-index Jacobian of x + u: du_o/di_k + A[o, k], contiguous
    jac = [[grads[k][o] + float(linear[o, k]) for k in range(d)] for o in range(d)]
    return _determinant_of_entries(jac) / float(np.linalg.det(linear))


def folding_percent(det: torch.Tensor) -> float:
    """The share of a Jacobian-determinant map's voxels that fold (``det <= 0``), in %."""
    return float((det <= 0).double().mean() * 100)


def scaling_and_squaring(
    velocity: torch.Tensor, steps: int = 7, *, padding: Padding = "border"
) -> torch.Tensor:
    """Exponential of a stationary velocity field (normalised units) by scaling and squaring.

    Returns the displacement of ``exp(v)``: ``u = v / 2**steps``, then ``steps`` times
    ``u <- u o u``. ``exp(-v)`` is its inverse up to discretisation error.
    """
    if steps < 0:
        raise ValueError("steps must be >= 0")
    disp: torch.Tensor = velocity / (2**steps)
    for _ in range(steps):
        disp = compose_displacements(disp, disp, padding=padding)
    return disp


def advect_displacement(
    velocity: torch.Tensor,
    start: torch.Tensor | None = None,
    *,
    steps: int = 10,
) -> torch.Tensor:
    """Integrate the map advection ``dPhi/dt = -DPhi v`` over ``t`` in [0, 1] with ``steps``
    fixed Runge-Kutta 4 steps, for a stationary velocity ``v`` (normalised units per unit
    time, ``(B, d, *spatial)``) on the grid of the map.

    The map is held as a displacement (``Phi(x) = x + u(x)``, normalised); ``start`` is the
    displacement of ``Phi(0)`` (identity when None). The result is ``Phi(0) o phi_-1``, with
    ``phi_t`` the flow of ``v``: a constant ``v`` shifts the start map by ``-v`` exactly, and
    integrating ``-v`` from the identity gives the inverse map ``phi_1``. Spatial derivatives
    are central differences (one-sided at the border); keep ``|v| / steps`` within a voxel
    (a CFL bound). Differentiable in ``velocity`` and ``start``.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    d = velocity.shape[1]
    shape = tuple(velocity.shape[2:])
    # normalised units per voxel index, per axis: d/dx_norm = (n - 1) / 2 * d/di
    per_voxel = [(n - 1) / 2.0 if n > 1 else 0.0 for n in shape]

    def rate(u: torch.Tensor) -> torch.Tensor:
        # -(I + Du) v: the map's own motion -v plus its advected displacement -Du v
        grads = torch.gradient(u, dim=tuple(range(2, d + 2)))
        out = -velocity
        for a in range(d):
            out = out - grads[a] * (velocity[:, a : a + 1] * per_voxel[a])
        return out

    u = torch.zeros_like(velocity) if start is None else start
    h = 1.0 / steps
    for _ in range(steps):
        k1 = rate(u)
        k2 = rate(u + 0.5 * h * k1)
        k3 = rate(u + 0.5 * h * k2)
        k4 = rate(u + h * k3)
        u = u + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)
    return u


def world_points(
    geometry: Geometry,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """World coordinates (mm) of every voxel centre of ``geometry``: ``(1, *shape, d)``.

    float32 keeps world positions to ~2e-5 mm at 250 mm from the origin.
    """
    grid = identity_grid(geometry.shape, device=device, dtype=dtype)
    return transform_points(np.asarray(geometry.normalized_to_world), grid)
