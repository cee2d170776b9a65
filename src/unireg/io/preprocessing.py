"""Bringing a volume onto a network's grid: an RAS-aligned grid of a chosen spacing and shape
centred on the head (world space, through the volume's own affine), intensities to [0, 1].

Used alike by training (every sample) and inference (the images a user registers)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch

from unireg.io.image import Image, LabelMap, check_same_grid, normalize_intensity, resample
from unireg.spatial.geometry import Geometry, apply_matrix_np


def face_median(volume: torch.Tensor) -> float:
    """The median of the values on the faces of ``volume`` (its first and last slice along
    every axis): the background's intensity of an image whose object lies inside the grid."""
    faces = []
    for axis in range(volume.ndim):
        for index in (0, volume.shape[axis] - 1):
            faces.append(volume.select(axis, index).reshape(-1))
    return float(torch.cat(faces).median())


@dataclass(frozen=True)
class Preprocessing:
    """How volumes are brought to a common grid.

    Attributes:
        spacing: output voxel size in mm (one value or one per axis).
        shape: output grid shape; ``None`` covers the whole input field of view.
        center: ``"fov"`` centres the grid on the input's field of view, ``"mass"`` on the
            centre of mass of the intensity's distance from the background's
            (:func:`face_median`; of the label map's foreground for label-only volumes).
        normalize: rescale intensities to [0, 1] by the 0.5/99.5 percentiles.
        ndim: 2 or 3.
    """

    spacing: float | tuple[float, ...] = 2.0
    shape: tuple[int, ...] | None = None
    center: Literal["fov", "mass"] = "mass"
    normalize: bool = True
    ndim: int = 3

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], ndim: int = 3) -> Preprocessing:
        """The grid a network was trained on, from a checkpoint's ``preprocessing`` settings
        (``spacing_mm``, ``shape``, ``center``)."""
        return cls(
            spacing=float(settings.get("spacing_mm", 2.0)),
            shape=tuple(settings.get("shape", (96, 112, 96))),
            center=settings.get("center", "mass"), ndim=ndim,
        )  # fmt: skip

    def spacing_tuple(self) -> tuple[float, ...]:
        sp = self.spacing
        out = (float(sp),) * self.ndim if isinstance(sp, int | float) else tuple(map(float, sp))
        if len(out) != self.ndim or min(out) <= 0:
            raise ValueError(f"spacing must be {self.ndim} positive values, got {sp}")
        return out

    def mass_voxel(self, source: Image) -> np.ndarray | None:
        """The centre of mass ``center="mass"`` places the grid on, in ``source``'s voxel
        coordinates (it depends on the voxels, not on the affine); None when nothing weighs."""
        if source.is_label:
            weights = (source.data[0] > 0).double()
        else:  # distance from the background's intensity (the median of the grid's faces):
            # air, dark or bright, weighs nothing and noise in it little
            weights = source.data.double().sum(0)
            weights = (weights - face_median(weights)).abs()
        total = float(weights.sum())
        if total <= 0:
            return None
        idx = torch.meshgrid(
            *[torch.arange(n, dtype=torch.float64) for n in source.geometry.shape], indexing="ij"
        )
        return np.array([float((weights * i).sum()) / total for i in idx])

    def target_geometry(self, source: Image, mass_voxel: np.ndarray | None = None) -> Geometry:
        """The RAS-aligned output grid for a volume on ``source``'s grid. ``mass_voxel``: its
        :meth:`mass_voxel`, when already known (e.g. for copies of one volume whose affines
        differ)."""
        geom = source.geometry
        d = self.ndim
        spacing = np.array(self.spacing_tuple())
        if self.center == "mass":
            vox = self.mass_voxel(source) if mass_voxel is None else mass_voxel
            if vox is None:
                center = geom.center_world
            else:
                center = apply_matrix_np(geom.voxel_to_world, vox[None])[0]
        elif self.center == "fov":
            center = geom.center_world
        else:
            raise ValueError(f"center must be 'fov' or 'mass', got {self.center!r}")
        if self.shape is None:
            corners = np.array(np.meshgrid(*[[0, n - 1] for n in geom.shape], indexing="ij"))
            world = apply_matrix_np(geom.voxel_to_world, corners.reshape(d, -1).T)
            extent = world.max(0) - world.min(0)
            shape = tuple(
                int(np.ceil(e / s - 1e-6)) + 1 for e, s in zip(extent, spacing, strict=True)
            )
        else:
            shape = tuple(int(n) for n in self.shape)
            if len(shape) != d:
                raise ValueError(f"shape {shape} is not {d}D")
        affine = np.eye(d + 1)
        affine[:d, :d] = np.diag(spacing)
        affine[:d, d] = center - spacing * (np.array(shape) - 1) / 2
        return Geometry(shape, affine)

    def __call__(
        self, image: Image | None, labels: LabelMap | None = None
    ) -> tuple[Image | None, LabelMap | None]:
        """Resample an image and/or its label map (on the image's grid) onto the output grid."""
        if image is None and labels is None:
            raise ValueError("nothing to preprocess")
        if image is not None and labels is not None:
            check_same_grid(image, labels)
        source = image if image is not None else labels
        assert source is not None
        geom = self.target_geometry(source)
        out_image = out_labels = None
        if image is not None:
            out_image = resample(image, geom)
            if self.normalize:
                out_image = normalize_intensity(out_image)
        if labels is not None:
            out = resample(labels, geom, mode="nearest")
            assert isinstance(out, LabelMap)
            out_labels = out
        return out_image, out_labels

    def key(self) -> dict[str, Any]:
        d = asdict(self)
        d["spacing"] = list(self.spacing_tuple())
        return d
