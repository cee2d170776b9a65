"""Affine matrices: composition, inversion, construction from parameters, seeded sampling.

Matrices are homogeneous ``(..., d+1, d+1)`` tensors acting on column vectors; they are
frame-agnostic (use :mod:`unireg.spatial.geometry` to move between voxel, normalised and world
frames). ``compose_affine(a, b)`` is the point map ``x -> a(b(x))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def compose_affine(*matrices: torch.Tensor) -> torch.Tensor:
    """Compose affines as point maps: ``compose_affine(a, b, c)(x) = a(b(c(x)))``."""
    if not matrices:
        raise ValueError("compose_affine needs at least one matrix")
    out = matrices[0]
    for m in matrices[1:]:
        out = out @ m.to(out.dtype)
    return out


def invert_affine(matrix: torch.Tensor) -> torch.Tensor:
    """Invert homogeneous affines exactly by blocks: ``[A t; 0 1]^-1 = [A^-1  -A^-1 t; 0 1]``."""
    d = matrix.shape[-1] - 1
    lin_inv = torch.linalg.inv(matrix[..., :d, :d])
    out = torch.zeros_like(matrix)
    out[..., :d, :d] = lin_inv
    out[..., :d, d] = -(lin_inv @ matrix[..., :d, d : d + 1]).squeeze(-1)
    out[..., d, d] = 1.0
    return out


def homogeneous(linear: torch.Tensor, translation: torch.Tensor | None = None) -> torch.Tensor:
    """Build ``(..., d+1, d+1)`` matrices from linear parts ``(..., d, d)`` and translations."""
    d = linear.shape[-1]
    out = torch.zeros(*linear.shape[:-2], d + 1, d + 1, dtype=linear.dtype, device=linear.device)
    out[..., :d, :d] = linear
    if translation is not None:
        out[..., :d, d] = translation
    out[..., d, d] = 1.0
    return out


def rotation_matrix(angles: torch.Tensor) -> torch.Tensor:
    """Rotation matrices from angles in radians.

    ``angles`` is ``(..., 1)`` for 2D (rotation from axis 0 towards axis 1) or ``(..., 3)`` for
    3D, giving ``R = R_0(a_0) @ R_1(a_1) @ R_2(a_2)`` where ``R_k`` rotates about axis ``k``.
    Returns ``(..., d, d)``.
    """
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[..., 0]), torch.zeros_like(c[..., 0])
    if angles.shape[-1] == 1:
        return torch.stack(
            [torch.stack([c[..., 0], -s[..., 0]], -1), torch.stack([s[..., 0], c[..., 0]], -1)], -2
        )
    if angles.shape[-1] != 3:
        raise ValueError(f"angles must have 1 (2D) or 3 (3D) entries, got {angles.shape[-1]}")

    def about(axis: int) -> torch.Tensor:
        ca, sa = c[..., axis], s[..., axis]
        rows = {
            0: [[one, zero, zero], [zero, ca, -sa], [zero, sa, ca]],
            1: [[ca, zero, sa], [zero, one, zero], [-sa, zero, ca]],
            2: [[ca, -sa, zero], [sa, ca, zero], [zero, zero, one]],
        }[axis]
        return torch.stack([torch.stack(r, -1) for r in rows], -2)

    return about(0) @ about(1) @ about(2)


def affine_from_parameters(
    *,
    rotation: torch.Tensor | None = None,
    translation: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shear: torch.Tensor | None = None,
    center: torch.Tensor | None = None,
    ndim: int | None = None,
) -> torch.Tensor:
    """Affine ``x -> R S H (x - c) + c + t`` from batched parameters.

    Args:
        rotation: radians, ``(B, 1)`` in 2D or ``(B, 3)`` in 3D (see :func:`rotation_matrix`).
        translation: ``(B, d)`` in the units of the points.
        scale: ``(B, d)`` per-axis factors.
        shear: ``(B, d(d-1)/2)`` upper-triangular shear coefficients of ``H`` (row-major).
        center: ``(d,)`` or ``(B, d)`` centre of rotation, scaling and shear (default origin).
        ndim: needed only when every parameter is omitted.
    """
    given = [p for p in (rotation, translation, scale, shear) if p is not None]
    ref = given[0] if given else torch.zeros(1, 1)
    if ndim is None:
        if translation is not None:
            ndim = translation.shape[-1]
        elif scale is not None:
            ndim = scale.shape[-1]
        elif rotation is not None:
            ndim = 2 if rotation.shape[-1] == 1 else 3
        elif shear is not None:
            ndim = 2 if shear.shape[-1] == 1 else 3
        else:
            raise ValueError("give at least one parameter or ndim")
    batch = ref.shape[0] if given else 1
    eye = torch.eye(ndim, dtype=ref.dtype, device=ref.device).expand(batch, ndim, ndim)
    lin = eye.clone()
    if shear is not None:
        h = eye.clone()
        iu = torch.triu_indices(ndim, ndim, offset=1)
        h[:, iu[0], iu[1]] = shear
        lin = h
    if scale is not None:
        lin = torch.diag_embed(scale) @ lin
    if rotation is not None:
        lin = rotation_matrix(rotation) @ lin
    t = torch.zeros(batch, ndim, dtype=ref.dtype, device=ref.device)
    if translation is not None:
        t = t + translation
    if center is not None:
        c = center.to(ref.dtype).expand(batch, ndim)
        t = t + c - (lin @ c.unsqueeze(-1)).squeeze(-1)
    return homogeneous(lin, t)


def _uniform(
    shape: Sequence[int], low: float, high: float, generator: torch.Generator
) -> torch.Tensor:
    return low + (high - low) * torch.rand(*shape, generator=generator, dtype=torch.float64)


def random_affine(
    ndim: int,
    batch: int = 1,
    *,
    rotation: float = 0.0,
    translation: float | Sequence[float] = 0.0,
    scale: tuple[float, float] = (1.0, 1.0),
    shear: float = 0.0,
    center: torch.Tensor | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sample random affines ``(batch, d+1, d+1)``, reproducibly.

    Args:
        ndim: 2 or 3.
        rotation: maximum absolute angle in **degrees**, drawn uniformly per rotation axis.
        translation: maximum absolute shift per axis (scalar or per-axis), in point units.
        scale: ``(low, high)`` range of per-axis scale factors, drawn log-uniformly.
        shear: maximum absolute shear coefficient, drawn uniformly.
        center: centre of rotation/scale/shear (default: origin, i.e. the grid centre in the
            normalised frame).
        seed / generator: the same seed gives the same matrices (CPU generator).
    """
    if generator is None:
        if seed is None:  # follow torch's global RNG (torch.manual_seed) without reseeding it
            seed = int(torch.randint(0, 2**62, (1,)))
        generator = torch.Generator().manual_seed(int(seed) % (2**63))
    n_rot = 1 if ndim == 2 else 3
    rot = _uniform((batch, n_rot), -1.0, 1.0, generator) * math.radians(rotation)
    tmax = torch.as_tensor(translation, dtype=torch.float64).expand(ndim)
    trans = _uniform((batch, ndim), -1.0, 1.0, generator) * tmax
    lo, hi = scale
    if lo <= 0 or hi < lo:
        raise ValueError(f"scale range must satisfy 0 < low <= high, got {scale}")
    scl = torch.exp(_uniform((batch, ndim), math.log(lo), math.log(hi), generator))
    shr = _uniform((batch, ndim * (ndim - 1) // 2), -shear, shear, generator)
    c = None if center is None else torch.as_tensor(center, dtype=torch.float64)
    m = affine_from_parameters(rotation=rot, translation=trans, scale=scl, shear=shr, center=c)
    return m.to(dtype)
