"""Image pyramids for coarse-to-fine solvers.

Level ``f`` of an image of ``n`` voxels per axis has ``round((n - 1) / f) + 1`` voxels: its first
and last voxel centres are the original ones, so normalised coordinates (``align_corners=True``)
mean the same point at every level and transforms move between levels unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from unireg.spatial.filters import filter_axis, gaussian_kernel1d
from unireg.spatial.geometry import Geometry


def level_shape(shape: Sequence[int], factor: float) -> tuple[int, ...]:
    """Spatial shape of the pyramid level ``factor`` (1 = full resolution), at least 4 voxels
    per axis (or the full size when that is smaller)."""
    if factor < 1:
        raise ValueError(f"pyramid factors are >= 1, got {factor}")
    return tuple(min(n, max(round((n - 1) / factor) + 1, 4)) for n in shape)


def downsample(
    x: torch.Tensor,
    factor: float,
    *,
    smooth: bool = True,
    shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """Level ``factor`` of ``x`` ``(B, C, *spatial)``: Gaussian anti-aliasing with sigma
    ``factor / 2`` voxels (as ANTs' default smoothing schedule), then linear resampling to
    ``shape`` (default :func:`level_shape`; give the shape of an image's level made another
    way, octave by octave, so that a mask or label map matches it voxel for voxel)."""
    shape = level_shape(x.shape[2:], factor) if shape is None else tuple(shape)
    if factor == 1 and shape == tuple(x.shape[2:]):
        return x
    mode = "bilinear" if x.ndim == 4 else "trilinear"
    if not smooth:
        return F.interpolate(x, size=shape, mode=mode, align_corners=True)
    # smoothing and linear resampling are both separable: one axis at a time, each axis
    # blurred on the grid already reduced along the axes before it (same result, less work)
    kernel = gaussian_kernel1d(factor / 2.0)
    for axis, n in enumerate(shape):
        x = filter_axis(x, kernel, axis, padding="replicate")
        size = list(x.shape[2:])
        size[axis] = n
        x = F.interpolate(x, size=size, mode=mode, align_corners=True)
    return x


def pyramid(x: torch.Tensor, factors: Sequence[float]) -> list[torch.Tensor]:
    """``[downsample(x, f) for f in factors]`` (each level from the full-resolution input)."""
    return [downsample(x, f) for f in factors]


def cascade(x: torch.Tensor, factors: Sequence[float]) -> list[torch.Tensor]:
    """The levels of :func:`pyramid` (same shapes and total Gaussian blur, sigma ``f / 2``
    full-resolution voxels), each made from the next finer one: only the finest level is
    filtered at full resolution, so a deep pyramid costs little more than its first level.
    Equal to :func:`pyramid` up to the extra linear interpolation between levels."""
    full = tuple(x.shape[2:])
    mode = "bilinear" if x.ndim == 4 else "trilinear"
    out: dict[float, torch.Tensor] = {}
    level, blur = x, 0.0  # blur so far, full-resolution voxels
    for factor in sorted(set(float(f) for f in factors)):
        if factor == 1:
            out[factor] = x
            continue
        sigma = (max((factor / 2.0) ** 2 - blur**2, 0.0)) ** 0.5
        target = level_shape(full, factor)
        for axis, n in enumerate(target):
            # voxels of the current level per full-resolution voxel along this axis
            step = (full[axis] - 1) / max(level.shape[axis + 2] - 1, 1)
            level = filter_axis(level, gaussian_kernel1d(sigma / step), axis, padding="replicate")
            size = list(level.shape[2:])
            size[axis] = n
            level = F.interpolate(level, size=size, mode=mode, align_corners=True)
        out[factor], blur = level, factor / 2.0
    return [out[float(f)] for f in factors]


def level_geometry(geometry: Geometry, shape: Sequence[int]) -> Geometry:
    """The world placement of a pyramid level of ``shape`` over the same extent: voxel centres
    ``i * (n - 1) / (m - 1)`` of the full grid, so the first and last ones coincide."""
    d = geometry.ndim
    scale = np.eye(d + 1)
    for a, (n, m) in enumerate(zip(geometry.shape, shape, strict=True)):
        scale[a, a] = (n - 1) / (m - 1) if m > 1 else 1.0
    return Geometry(tuple(shape), geometry.voxel_to_world @ scale)


def principal_axes(fixed: torch.Tensor, moving: torch.Tensor, tolerance: float) -> torch.Tensor:
    """The projection ``(k, C)`` of :func:`principal_channels`: the fewest principal axes of
    the joint channel covariance of ``fixed`` ``(B, C, ...)`` and ``moving`` ``(B, C, ...)``
    that leave out at most ``tolerance`` of its trace, as rows scaled by ``sqrt(k / C)``.
    Any samples of the two feature maps serve (every voxel, or every second one)."""
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    c = fixed.shape[1]
    if moving.shape[1] != c:
        raise ValueError(f"fixed and moving need the same channels, got {c} and {moving.shape[1]}")
    # the joint channel covariance, one image at a time (no joint copy of the features)
    flat = [x.transpose(0, 1).reshape(c, -1) for x in (fixed, moving)]
    count = sum(x.shape[1] for x in flat)
    mean = (flat[0].sum(1, dtype=torch.float64) + flat[1].sum(1, dtype=torch.float64)) / count
    cov = torch.zeros(c, c, dtype=torch.float64, device=fixed.device)
    for x in flat:
        centred = x - mean.to(x.dtype)[:, None]
        cov += (centred @ centred.T).double()
    values, vectors = torch.linalg.eigh(cov / count)  # ascending
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    left_out = values.sum() - values.cumsum(0)  # variance beyond the first k + 1 axes
    k = int((left_out > tolerance * values.sum()).sum()) + 1
    basis: torch.Tensor = (vectors[:, :k] * (k / c) ** 0.5).T
    return basis.to(fixed)


def project_channels(basis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, C, ...)`` onto the rows of ``basis`` ``(k, C)``: ``(B, k, ...)``."""
    out: torch.Tensor = torch.einsum("kc,bc...->bk...", basis, x)
    return out


def principal_channels(
    fixed: torch.Tensor, moving: torch.Tensor, tolerance: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fixed`` ``(B, C, *shape)`` and ``moving`` ``(B, C, *moving_shape)`` projected onto the
    fewest principal axes of their joint channel covariance that leave out at most
    ``tolerance`` of its trace (its variance), scaled by ``sqrt(k / C)``
    (:func:`principal_axes`).

    The projection is linear and the same for both, so it commutes with warping by linear
    interpolation: the channel-mean squared difference of the projected features under any
    warp is that of the features restricted to the kept axes (the scale keeps its size;
    outside a zero-padded moving image both are zero).
    A solver comparing ``k`` channels instead of ``C`` does ``C / k`` times less sampling.
    ``tolerance`` 0 returns the inputs.
    """
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    if tolerance == 0 or fixed.shape[1] == 1:
        return fixed, moving
    basis = principal_axes(fixed, moving, tolerance)
    return project_channels(basis, fixed), project_channels(basis, moving)
