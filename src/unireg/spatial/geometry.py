"""Voxel grids and the three coordinate frames unireg uses.

Frames, for a grid of spatial shape ``(n_0, ..., n_{d-1})`` (the tensor's spatial axes):

* **voxel**: continuous indices ``(i_0, ..., i_{d-1})`` in tensor-axis order, voxel centres at
  integers.
* **normalised**: ``x_a = 2 * i_a / (n_a - 1) - 1`` per axis, so the first and last voxel centres
  are at -1 and +1 (PyTorch's ``align_corners=True``), still in tensor-axis order. An axis of
  size 1 uses ``x_a = i_a`` so that every matrix stays invertible.
* **world**: millimetres through the grid's ``(d+1) x (d+1)`` affine (NIfTI RAS+ for files).

All matrices here are homogeneous ``(d+1) x (d+1)`` float64 NumPy arrays that map column vectors
of the first frame to the second.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np


def voxel_to_normalized_matrix(shape: tuple[int, ...]) -> np.ndarray:
    """Homogeneous matrix mapping voxel indices to normalised ``[-1, 1]`` coordinates."""
    d = len(shape)
    m = np.eye(d + 1)
    for a, n in enumerate(shape):
        if n > 1:
            m[a, a] = 2.0 / (n - 1)
            m[a, d] = -1.0
    return m


def normalized_to_voxel_matrix(shape: tuple[int, ...]) -> np.ndarray:
    """Homogeneous matrix mapping normalised coordinates back to voxel indices."""
    return np.linalg.inv(voxel_to_normalized_matrix(shape))


def apply_matrix_np(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a homogeneous ``(d+1) x (d+1)`` matrix to points ``(..., d)`` (NumPy, float64)."""
    d = matrix.shape[0] - 1
    out: np.ndarray = points @ matrix[:d, :d].T + matrix[:d, d]
    return out


def rotation_about_axes(angle_deg: float, axes: Sequence[int], ndim: int) -> np.ndarray:
    """Rotation by ``angle_deg`` about each of the listed world axes in turn (3D), or in the
    plane (2D): ``(d, d)``."""
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    if ndim == 2:
        return np.array([[c, -s], [s, c]])
    out = np.eye(3)
    for axis in axes:
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = r @ out
    return out


def linear_about(linear: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """The homogeneous ``(d+1) x (d+1)`` map ``x -> L (x - c) + c``: the linear map ``L``
    ``(d, d)`` applied about the point ``c`` (world mm), which it leaves fixed."""
    linear = np.asarray(linear, dtype=np.float64)
    centre = np.asarray(centre, dtype=np.float64)
    d = linear.shape[0]
    m = np.eye(d + 1)
    m[:d, :d] = linear
    m[:d, d] = centre - linear @ centre
    return m


@dataclass(frozen=True, eq=False)
class Geometry:
    """A voxel grid placed in world space.

    Attributes:
        shape: spatial shape, in tensor-axis order (the NIfTI array's i, j, k).
        affine: ``(d+1) x (d+1)`` voxel-to-world matrix, world in millimetres (RAS+ for NIfTI).
    """

    shape: tuple[int, ...]
    affine: np.ndarray

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        affine = np.asarray(self.affine, dtype=np.float64)
        d = len(shape)
        if d not in (2, 3):
            raise ValueError(f"Geometry supports 2D and 3D grids, got shape {shape}")
        if any(s < 1 for s in shape):
            raise ValueError(f"Geometry shape must be positive, got {shape}")
        if affine.shape != (d + 1, d + 1):
            raise ValueError(f"a {d}D grid needs a {d + 1}x{d + 1} affine, got {affine.shape}")
        if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:d, :d])) < 1e-12:
            raise ValueError(f"the voxel-to-world affine is not invertible:\n{affine}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "affine", affine)

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return len(self.shape)

    @cached_property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in millimetres along each tensor axis (column norms of the affine)."""
        d = self.ndim
        return tuple(float(v) for v in np.linalg.norm(self.affine[:d, :d], axis=0))

    @cached_property
    def voxel_to_world(self) -> np.ndarray:
        """Voxel indices -> world mm."""
        return self.affine

    @cached_property
    def world_to_voxel(self) -> np.ndarray:
        """World mm -> voxel indices."""
        return np.linalg.inv(self.affine)

    @cached_property
    def voxel_to_normalized(self) -> np.ndarray:
        """Voxel indices -> normalised coordinates."""
        return voxel_to_normalized_matrix(self.shape)

    @cached_property
    def normalized_to_world(self) -> np.ndarray:
        """Normalised coordinates -> world mm."""
        out: np.ndarray = self.affine @ normalized_to_voxel_matrix(self.shape)
        return out

    @cached_property
    def world_to_normalized(self) -> np.ndarray:
        """World mm -> normalised coordinates."""
        out: np.ndarray = self.voxel_to_normalized @ self.world_to_voxel
        return out

    @property
    def center_world(self) -> np.ndarray:
        """World position (mm) of the grid's centre (normalised origin)."""
        return self.normalized_to_world[: self.ndim, self.ndim].copy()

    @property
    def corners_world(self) -> np.ndarray:
        """World positions (mm) of the grid's ``2^d`` corner voxel centres, ``(2^d, d)``."""
        d = self.ndim
        idx = np.array(list(itertools.product(*[(0, n - 1) for n in self.shape])), float)
        out: np.ndarray = idx @ self.voxel_to_world[:d, :d].T + self.voxel_to_world[:d, d]
        return out

    def regrid(self, spacing: Sequence[float]) -> Geometry:
        """A grid of the same axes, centre and field of view with voxels of ``spacing`` (mm
        per axis); each axis keeps ``round(n * old / new)`` voxels, at least 2."""
        old = np.array(self.spacing)
        new = np.array(spacing, dtype=np.float64)
        shape = tuple(max(2, int(round(n * o / s))) for n, o, s in zip(self.shape, old, new,
                                                                        strict=True))  # fmt: skip
        d = self.ndim
        out = np.eye(d + 1)
        out[:d, :d] = np.array(self.affine, dtype=np.float64)[:d, :d] / old * new
        out[:d, d] = self.center_world - out[:d, :d] @ ((np.array(shape) - 1) / 2)
        return Geometry(shape, out)

    def extended(self, before: Sequence[int], after: Sequence[int]) -> Geometry:
        """The grid grown by ``before[a]`` voxels ahead of its first one and ``after[a]`` past
        its last one along each axis ``a``: the same axes, spacing and voxel positions."""
        d = self.ndim
        out = np.array(self.voxel_to_world, dtype=np.float64)
        out[:d, d] = out[:d, :d] @ -np.asarray(before, dtype=np.float64) + out[:d, d]
        shape = tuple(int(n + b + a) for n, b, a in zip(self.shape, before, after, strict=True))
        return Geometry(shape, out)

    def same_grid(self, other: Geometry, atol: float = 1e-4) -> bool:
        """True when both grids have the same shape and the same affine (to ``atol`` mm)."""
        return self.shape == other.shape and bool(
            np.allclose(self.affine, other.affine, atol=atol, rtol=0)
        )

    def __repr__(self) -> str:
        spacing = ", ".join(f"{s:.3g}" for s in self.spacing)
        return f"Geometry(shape={self.shape}, spacing=({spacing}) mm)"


def normalized_map_matrix(
    world_matrix: np.ndarray, fixed: Geometry, moving: Geometry
) -> np.ndarray:
    """Express a world fixed->moving affine as a map between normalised grid coordinates.

    Returns ``N_m A_m^-1 T A_f N_f^-1``: fixed-grid normalised points to moving-grid normalised
    points, where ``T`` maps fixed world mm to moving world mm.
    """
    out: np.ndarray = (
        moving.world_to_normalized
        @ np.asarray(world_matrix, np.float64)
        @ fixed.normalized_to_world
    )
    return out


def world_map_matrix(
    normalized_matrix: np.ndarray, fixed: Geometry, moving: Geometry
) -> np.ndarray:
    """Inverse of :func:`normalized_map_matrix`: a normalised-frame affine as a world-mm affine."""
    out: np.ndarray = (
        moving.normalized_to_world
        @ np.asarray(normalized_matrix, np.float64)
        @ fixed.world_to_normalized
    )
    return out
