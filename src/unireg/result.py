"""The one result type every registration method returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from unireg.io.image import Image, resample
from unireg.spatial.geometry import Geometry
from unireg.spatial.transform import Transform


@dataclass
class RegistrationResult:
    """A registration of ``moving`` onto ``fixed``.

    Attributes:
        transform: fixed world -> moving world point map (mm, RAS+); warping pulls the moving
            image back onto the fixed grid through it.
        fixed, moving: the grids of the two inputs.
        inverse: moving world -> fixed world, when the method gives one.
        warped: the moving image on the fixed grid, when the method produced it.
        extras: method extras (keypoints, intermediate fields, optimiser trace ...).
        elapsed: wall time of the registration, seconds.
        peak_memory: peak memory of the registration, bytes, when measured.
    """

    transform: Transform
    fixed: Geometry
    moving: Geometry
    inverse: Transform | None = None
    warped: Image | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    elapsed: float | None = None
    peak_memory: int | None = None

    def warp(self, image: Image, *, mode: str | None = None) -> Image:
        """Resample any image or label map of the moving subject onto the fixed grid (label
        maps with nearest neighbour unless ``mode="onehot"``)."""
        return resample(image, self.fixed, self.transform, mode=mode)
