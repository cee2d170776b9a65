"""KeyMorph (Yu et al., MIDL 2022; Wang et al., the TPS extension): a CNN detects ``K``
keypoints in each image; the transform that best aligns the fixed keypoints with the moving
ones follows in closed form (rigid, affine, or thin-plate spline with regularisation lambda)
and is differentiable, so the detector trains end to end through it.

Keypoints leave the detector in each image's normalised coordinates and are aligned in world
space, so fixed and moving images may have different grids, spacings and orientations
(anisotropic voxels are handled). Points are expressed in units of ``unit_mm`` millimetres
around the fixed image's centre for the solve: the TPS lambda then means the same at any
resolution (with the default 64 mm, a 128 mm field of view spans [-1, 1], as in the papers'
normalised coordinates).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from unireg.methods.keymorph import TRANSFORMS
from unireg.methods.pipeline import in_dtype
from unireg.nets.keypoints import KeypointDetector
from unireg.spatial.field import world_points
from unireg.spatial.geometry import Geometry
from unireg.spatial.grid import affine_grid, as_matrix, transform_points
from unireg.spatial.keypoints import ThinPlateSpline, fit_keypoint_transform


@dataclass
class KeypointAlignment:
    """One closed-form alignment, fixed -> moving, in the solve frame (``unit_mm`` mm about
    ``origin``, world axes): a ``(B, d+1, d+1)`` matrix or a :class:`ThinPlateSpline`."""

    kind: str
    transform: torch.Tensor | ThinPlateSpline
    origin: torch.Tensor  # (d,) world mm
    unit_mm: float
    lam: float | None = None

    def to_solve(self, world: torch.Tensor) -> torch.Tensor:
        return (world - self.origin.to(world)) / self.unit_mm

    def from_solve(self, points: torch.Tensor) -> torch.Tensor:
        return points * self.unit_mm + self.origin.to(points)

    def map_world(self, world: torch.Tensor, chunk: int = 2**16) -> torch.Tensor:
        """Map fixed world points ``(B, M, d)`` (mm) to moving world points."""
        p = self.to_solve(world)
        if isinstance(self.transform, ThinPlateSpline):
            out = self.transform(p, chunk=chunk)
        else:
            out = transform_points(self.transform.to(p), p)
        return self.from_solve(out)

    def world_matrix(self) -> torch.Tensor:
        """The world-mm matrix ``(B, d+1, d+1)`` of a rigid/affine alignment."""
        if isinstance(self.transform, ThinPlateSpline):
            raise TypeError("a thin-plate spline has no matrix")
        d = self.transform.shape[-1] - 1
        to = torch.eye(d + 1, dtype=self.transform.dtype, device=self.transform.device)
        to[:d, :d] /= self.unit_mm
        to[:d, d] = -self.origin.to(to) / self.unit_mm
        return torch.linalg.inv(to) @ self.transform @ to


class KeyMorph(nn.Module):
    """Detector plus closed-form alignment. ``forward`` returns the sampling grid of the moving
    image for every fixed voxel and the keypoints; :meth:`align` gives any transform (and any
    lambda, several at once) from keypoints already detected.

    Optionally two-stage (``coarse``, for anatomical keypoints): the ``coarse`` detector,
    trained for heads in any orientation, finds the keypoints first; the rotation of the rigid
    fit from ``template`` (the training subjects' mean keypoints, world mm, centred, buffer
    ``(K, d)``) to them says how the head is turned; the image is turned upright and
    ``detector``, trained on upright heads only (small rotations), finds the keypoints used
    (:func:`detect_keypoints`). Only ``detector`` trains; ``coarse`` is frozen."""

    def __init__(
        self,
        detector: KeypointDetector,
        unit_mm: float = 64.0,
        coarse: KeypointDetector | None = None,
    ):
        super().__init__()
        self.detector = detector
        self.unit_mm = float(unit_mm)
        self.config = {"detector": dict(detector.config), "unit_mm": self.unit_mm}
        self.coarse = coarse
        if coarse is not None:
            if coarse.num_keypoints != detector.num_keypoints or coarse.ndim != detector.ndim:
                raise ValueError("the coarse detector must find the same keypoints")
            coarse.requires_grad_(False)
            self.register_buffer("template", torch.zeros(detector.num_keypoints, detector.ndim))
            self.config["coarse"] = dict(coarse.config)

    @staticmethod
    def new_modules() -> list[str]:
        """Parameter-name prefixes a fine-tuning run may start fresh when its init checkpoint
        lacks them: the detector's decoder levels, which start as the identity, and the coarse
        stage, which the run loads itself."""
        return ["detector.decoder.", "coarse.", "template"]

    @classmethod
    def from_config(cls, config: dict) -> KeyMorph:
        coarse = KeypointDetector(**config["coarse"]) if config.get("coarse") else None
        return cls(KeypointDetector(**config["detector"]), config["unit_mm"], coarse)

    def keypoints_world(
        self,
        image: torch.Tensor,
        geometry: Geometry | Sequence[Geometry],
        *,
        coarse: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Keypoints ``(B, K, d)`` of ``image`` ``(B, C, *shape)`` in world mm, found by the
        detector (``coarse``: by the coarse stage) in one pass, its convolutions in ``dtype``
        (the keypoints in float32); ``geometry``: the grid of the whole batch, or one per
        batch element (each placed in its own world)."""
        geometries = [geometry] * image.shape[0] if isinstance(geometry, Geometry) else geometry
        if len(geometries) != image.shape[0]:
            raise ValueError("give one geometry, or one per batch element")
        if any(tuple(image.shape[2:]) != tuple(g.shape) for g in geometries):
            raise ValueError("the geometry does not match the image's shape")
        if coarse and self.coarse is None:
            raise ValueError("this KeyMorph model has no coarse stage")
        detector = self.coarse if coarse else self.detector
        with in_dtype(dtype, image.device):
            normalized = detector(image)
        if isinstance(geometry, Geometry):
            return self.to_world(normalized, geometry)
        return torch.cat([self.to_world(normalized[i : i + 1], g)
                          for i, g in enumerate(geometries)])  # fmt: skip

    @staticmethod
    def to_world(normalized: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """Detector keypoints ``(B, K, d)`` (normalised coordinates of ``geometry``'s grid) in
        world mm."""
        return transform_points(as_matrix(geometry.normalized_to_world, normalized), normalized)

    def align(
        self,
        fixed_kp: torch.Tensor,
        moving_kp: torch.Tensor,
        fixed_geometry: Geometry,
        transform: str = "affine",
        lam: float | Sequence[float] = 0.0,
        weights: torch.Tensor | None = None,
    ) -> KeypointAlignment | list[KeypointAlignment]:
        """The closed form from world keypoints (fixed -> moving). A sequence of lambdas gives
        one TPS alignment per value (the keypoints are reused, the network is not re-run)."""
        if transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {transform!r}; choose from {TRANSFORMS}")
        origin = torch.as_tensor(np.asarray(fixed_geometry.center_world), dtype=fixed_kp.dtype)
        origin = origin.to(fixed_kp.device)

        def one(value: float) -> KeypointAlignment:
            f = (fixed_kp - origin) / self.unit_mm
            m = (moving_kp - origin) / self.unit_mm
            fitted = fit_keypoint_transform(transform, f, m, lam=value, weights=weights)
            return KeypointAlignment(
                transform, fitted, origin, self.unit_mm, value if transform == "tps" else None
            )

        if isinstance(lam, Sequence) and not isinstance(lam, str):
            return [one(float(v)) for v in lam]
        return one(float(lam))

    def grid(
        self,
        alignment: KeypointAlignment,
        fixed_geometry: Geometry,
        moving_geometry: Geometry,
        *,
        chunk: int = 2**16,
    ) -> torch.Tensor:
        """Moving normalised sampling points ``(B, *fixed_shape, d)`` for every fixed voxel."""
        shape = tuple(fixed_geometry.shape)
        d = len(shape)
        if isinstance(alignment.transform, ThinPlateSpline):
            ref = alignment.transform.centers
            world = world_points(fixed_geometry, device=ref.device, dtype=ref.dtype)
            world = world.reshape(1, -1, d).expand(ref.shape[0], -1, -1)
            moving = alignment.map_world(world, chunk=chunk)
            out = transform_points(as_matrix(moving_geometry.world_to_normalized, ref), moving)
            return out.reshape(ref.shape[0], *shape, d)
        mat = alignment.world_matrix()
        norm = (
            as_matrix(moving_geometry.world_to_normalized, mat)
            @ mat
            @ as_matrix(fixed_geometry.normalized_to_world, mat)
        )
        return affine_grid(norm, shape)

    def forward(
        self,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        fixed_geometry: Geometry,
        moving_geometry: Geometry,
        transform: str = "affine",
        lam: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sampling grid ``(B, *fixed_shape, d)`` of the moving image, and the fixed and moving
        keypoints in world mm ``(B, K, d)``."""
        fk = self.keypoints_world(fixed, fixed_geometry)
        mk = self.keypoints_world(moving, moving_geometry)
        return self.solve_grid(fk, mk, fixed_geometry, moving_geometry, transform, lam), fk, mk

    def solve_grid(
        self,
        fixed_kp: torch.Tensor,
        moving_kp: torch.Tensor,
        fixed_geometry: Geometry,
        moving_geometry: Geometry,
        transform: str = "affine",
        lam: float = 0.0,
    ) -> torch.Tensor:
        """The moving image's sampling grid ``(B, *fixed_shape, d)`` from world keypoints
        ``(B, K, d)`` (mm) already detected: the closed form, then :meth:`grid`."""
        alignment = self.align(fixed_kp, moving_kp, fixed_geometry, transform, lam)
        assert isinstance(alignment, KeypointAlignment)
        return self.grid(alignment, fixed_geometry, moving_geometry)
