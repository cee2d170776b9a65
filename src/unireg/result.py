"""The one result type every registration method returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unireg.io.image import Image, LabelMap, resample, save_image
from unireg.io.transforms import save_transform
from unireg.spatial.geometry import Geometry
from unireg.spatial.transform import AffineTransform, Transform


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

    @property
    def affine(self) -> AffineTransform | None:
        """The linear part alone (world mm, fixed -> moving), when the method has one."""
        if isinstance(self.transform, AffineTransform):
            return self.transform
        matrix = self.extras.get("matrix")
        return None if matrix is None else AffineTransform(np.asarray(matrix))

    def save(
        self,
        outdir: str | Path,
        *,
        moving_labels: LabelMap | None = None,
        label_interpolation: str = "nearest",
    ) -> dict[str, Path]:
        """Write the command-line contract's files into ``outdir`` (created if needed):
        ``warped.nii.gz``, ``warped_labels.nii.gz`` (with ``moving_labels``),
        ``transform.nii.gz`` (the whole forward map as an ITK/ANTs displacement field on the
        fixed grid), ``affine.mat`` (the linear part, when there is one) and
        ``inverse_transform.nii.gz`` (on the moving grid, when there is an inverse).

        Each file is written atomically; if any write fails, the files this call already
        wrote are removed, so a failed save leaves nothing behind."""
        out = Path(outdir)
        out.mkdir(parents=True, exist_ok=True)
        written: dict[str, Path] = {}
        jobs: list[tuple[str, Any]] = []
        if self.warped is not None:
            jobs.append(("warped", lambda p: save_image(self.warped, p)))
        if moving_labels is not None:
            warped_labels = self.warp(moving_labels, mode=label_interpolation)
            jobs.append(("warped_labels", lambda p: save_image(warped_labels, p)))
        jobs.append(
            ("transform", lambda p: save_transform(self.transform, p, reference=self.fixed))
        )
        affine = self.affine
        if affine is not None:
            jobs.append(("affine", lambda p: save_transform(affine, p)))
        if self.inverse is not None:
            inverse = self.inverse
            jobs.append(
                ("inverse_transform", lambda p: save_transform(inverse, p, reference=self.moving))
            )
        names = {"affine": "affine.mat"}
        try:
            for key, job in jobs:
                path = out / names.get(key, f"{key}.nii.gz")
                job(path)
                written[key] = path
        except BaseException:
            for path in written.values():
                path.unlink(missing_ok=True)
            raise
        return written
