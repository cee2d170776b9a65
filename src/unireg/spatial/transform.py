"""World-space transforms: the objects that cross the file boundary.

A :class:`Transform` maps points of the fixed image, in world millimetres (RAS+, as NIfTI
affines give them), to points of the moving image. Warping an image with one samples the moving
image at ``T(x)`` for every voxel ``x`` of a reference (fixed) grid. All arithmetic reduces to
:func:`unireg.spatial.warp.sample` on normalised coordinates, so there is one warping code path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from unireg.spatial.field import world_points
from unireg.spatial.geometry import Geometry, normalized_map_matrix
from unireg.spatial.grid import affine_grid, channels_last, transform_points
from unireg.spatial.warp import Mode, Padding, sample, warp_affine, warp_labels


class Transform:
    """Base class: a fixed-world -> moving-world point map (mm)."""

    ndim: int

    def map_points(self, points: torch.Tensor) -> torch.Tensor:
        """Map fixed world points ``(..., d)`` (mm) to moving world points (mm)."""
        raise NotImplementedError

    def moving_points(
        self,
        reference: Geometry,
        moving: Geometry,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Moving-grid normalised coordinates of every reference voxel: ``(1, *ref.shape, d)``.

        Computed in ``dtype`` (frame matrices are composed in float64 first).
        """
        mapped = self.map_points(world_points(reference, device=device, dtype=dtype))
        return transform_points(moving.world_to_normalized, mapped)

    def displacement(
        self, reference: Geometry, *, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """World displacement ``T(x) - x`` in mm on the reference grid: ``(d, *ref.shape)``."""
        x = world_points(reference, device=device, dtype=torch.float64)
        return (self.map_points(x) - x)[0].movedim(-1, 0).float().contiguous()

    def warp(
        self,
        image: torch.Tensor,
        moving: Geometry,
        reference: Geometry,
        *,
        mode: Mode = "linear",
        padding: Padding = "zeros",
    ) -> torch.Tensor:
        """Resample a moving image ``(B, C, *moving.shape)`` onto the reference grid."""
        pts = self.moving_points(reference, moving, device=image.device, dtype=image.dtype)
        return sample(image, pts, mode=mode, padding=padding)

    def warp_labels(
        self,
        labels: torch.Tensor,
        moving: Geometry,
        reference: Geometry,
        *,
        method: Literal["nearest", "onehot"] = "nearest",
        background: int = 0,
    ) -> torch.Tensor:
        """Resample an integer label map ``(B, 1, *moving.shape)`` onto the reference grid."""
        pts = self.moving_points(reference, moving, device=labels.device)
        return warp_labels(labels, pts, method=method, background=background)


class AffineTransform(Transform):
    """``x -> M x`` with a homogeneous ``(d+1) x (d+1)`` matrix in world mm."""

    def __init__(self, matrix: np.ndarray | torch.Tensor) -> None:
        m = torch.as_tensor(np.asarray(matrix, dtype=np.float64))
        if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] not in (3, 4):
            raise ValueError(f"an affine is 3x3 (2D) or 4x4 (3D), got {tuple(m.shape)}")
        self.matrix = m
        self.ndim = m.shape[0] - 1

    @classmethod
    def identity(cls, ndim: int) -> AffineTransform:
        """The identity map in ``ndim`` dimensions."""
        return cls(np.eye(ndim + 1))

    def inverse(self) -> AffineTransform:
        """The inverse map (moving world -> fixed world)."""
        return AffineTransform(torch.linalg.inv(self.matrix))

    def map_points(self, points: torch.Tensor) -> torch.Tensor:
        return transform_points(self.matrix, points)

    def moving_points(
        self,
        reference: Geometry,
        moving: Geometry,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        # Compose all frames in float64 first: exact, and one pass over the grid.
        m = normalized_map_matrix(self.matrix.numpy(), reference, moving)
        return affine_grid(torch.from_numpy(m).to(device, dtype), reference.shape)

    def warp(
        self,
        image: torch.Tensor,
        moving: Geometry,
        reference: Geometry,
        *,
        mode: Mode = "linear",
        padding: Padding = "zeros",
    ) -> torch.Tensor:
        # one normalised-frame matrix: separable when the grids' axes agree (warp_affine)
        m = torch.from_numpy(normalized_map_matrix(self.matrix.numpy(), reference, moving))
        return warp_affine(image, m.to(image.device), reference.shape, mode=mode, padding=padding)

    def __repr__(self) -> str:
        return f"AffineTransform(\n{self.matrix.numpy()})"


class DisplacementFieldTransform(Transform):
    """``x -> x + u(x)`` with ``u`` a world-mm displacement field on a grid.

    ``u`` is interpolated linearly between grid points; outside the grid the displacement is 0
    (as in ITK's ``DisplacementFieldTransform``).
    """

    def __init__(self, displacement: torch.Tensor, geometry: Geometry) -> None:
        if displacement.shape != (geometry.ndim, *geometry.shape):
            raise ValueError(
                f"displacement {tuple(displacement.shape)} does not fit grid {geometry.shape}"
            )
        self.field = displacement
        self.geometry = geometry
        self.ndim = geometry.ndim

    def map_points(self, points: torch.Tensor) -> torch.Tensor:
        flat = points.reshape(1, -1, self.ndim)
        local = transform_points(self.geometry.world_to_normalized, flat)
        field = self.field.to(points.device, points.dtype).unsqueeze(0)
        u = sample(field, local, mode="linear", padding="zeros")  # (1, d, N)
        return (flat + u.transpose(1, 2)).reshape(points.shape)

    def moving_points(
        self,
        reference: Geometry,
        moving: Geometry,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        # W2N_m (x + u(x)) = (W2N_m N2W_r) x_norm + L u(x), L the linear part of W2N_m; on
        # its own grid the field needs no interpolation, on another it is resampled once
        d = self.ndim
        to_moving = moving.world_to_normalized
        m = to_moving @ reference.normalized_to_world
        points = affine_grid(torch.from_numpy(m).to(device, dtype), reference.shape)
        lin = torch.from_numpy(to_moving[:d, :d]).to(device, dtype)
        u = channels_last(self._on(reference, device, dtype)).reshape(-1, d)
        # points + u L^T in one matrix product (not one per row)
        return torch.addmm(points.reshape(-1, d), u, lin.T).reshape(points.shape)

    def _on(
        self, reference: Geometry, device: torch.device | str | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """The field (mm) at the reference voxels, 0 outside its grid: ``(1, d, *ref.shape)``."""
        field = self.field.to(device, dtype).unsqueeze(0)
        if reference.same_grid(self.geometry):
            return field
        m = torch.from_numpy(self.geometry.world_to_normalized @ reference.normalized_to_world)
        return warp_affine(field, m.to(field.device), reference.shape, padding="zeros")

    def displacement(
        self, reference: Geometry, *, device: torch.device | str | None = None
    ) -> torch.Tensor:
        return self._on(reference, device, torch.float32)[0]


class CompositeTransform(Transform):
    """A chain of transforms listed in ANTs order (``ants.apply_transforms(transformlist=...)``).

    The first transform is applied first to a fixed point: ``[T1, T2](x) = T2(T1(x))``. So
    ANTs' registration output ``[warp, affine]`` is ``affine(warp(x))``.
    """

    def __init__(self, transforms: Sequence[Transform]) -> None:
        if not transforms:
            raise ValueError("a composite transform needs at least one transform")
        dims = {t.ndim for t in transforms}
        if len(dims) != 1:
            raise ValueError(f"cannot chain transforms of different dimensions {sorted(dims)}")
        self.transforms = list(transforms)
        self.ndim = dims.pop()
        # Adjacent affines are merged into one matrix: exact, and one pass over the grid.
        merged: list[Transform] = []
        for t in self.transforms:
            if (
                isinstance(t, AffineTransform)
                and merged
                and isinstance(merged[-1], AffineTransform)
            ):
                merged[-1] = AffineTransform(t.matrix @ merged[-1].matrix)
            else:
                merged.append(t)
        self._merged = merged

    def map_points(self, points: torch.Tensor) -> torch.Tensor:
        for t in self._merged:
            points = t.map_points(points)
        return points

    def moving_points(
        self,
        reference: Geometry,
        moving: Geometry,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        first = self._merged[0]
        if len(self._merged) == 1:
            return first.moving_points(reference, moving, device=device, dtype=dtype)
        if (
            len(self._merged) == 2
            and isinstance(first, DisplacementFieldTransform)
            and isinstance(self._merged[1], AffineTransform)
        ):
            # [field, A] (ANTs' registration output): the affine folds into the moving frame,
            # W2N_m A = W2N of a grid placed by A^-1 V2W_m, so the field runs its own path
            inv = np.linalg.inv(self._merged[1].matrix.numpy())
            placed = Geometry(moving.shape, inv @ moving.voxel_to_world)
            return first.moving_points(reference, placed, device=device, dtype=dtype)
        return super().moving_points(reference, moving, device=device, dtype=dtype)

    def displacement(
        self, reference: Geometry, *, device: torch.device | str | None = None
    ) -> torch.Tensor:
        first = self._merged[0]
        if not isinstance(first, DisplacementFieldTransform):
            return super().displacement(reference, device=device)
        # a leading field is read at the reference voxels (no interpolation on its own grid)
        x = world_points(reference, device=device, dtype=torch.float64)
        points = x + channels_last(first._on(reference, device, torch.float64))
        for t in self._merged[1:]:
            points = t.map_points(points)
        return (points - x)[0].movedim(-1, 0).float().contiguous()
