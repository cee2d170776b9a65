"""The one result type every registration method returns, its typed extras, and the one
place a method's transform becomes a measured result (:func:`measured_result`)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unireg.io.image import Image, LabelMap, resample, save_image
from unireg.io.transforms import save_displacement_field, save_transform
from unireg.profiling import Measure
from unireg.spatial.geometry import Geometry
from unireg.spatial.transform import AffineTransform, Transform


@dataclass
class Extras:
    """What a method reports beside its transform.

    Attributes:
        method: a readable description of the method and its settings.
        matrix: the linear part (world mm, fixed -> moving, ``(d+1, d+1)``), when there is one.
        brain_stripped: ``"fixed"`` or ``"moving"`` when that image, a whole head, was
            registered stripped to its brain mask against a brain-extracted other
            (:func:`unireg.methods.extraction.match_extraction`); ``""`` otherwise.
    """

    method: str = ""
    matrix: np.ndarray | None = None
    brain_stripped: str = ""


@dataclass
class SolverExtras(Extras):
    """The training-free solvers: the stages run (None for ``affine-gn``) and the trace: for
    the stages one dict per stage and level (iterations, losses, seconds, converged), for
    ``affine-gn`` one ``(factor, iteration, residual)`` per iteration."""

    stages: list[Any] | None = None
    trace: list[Any] = field(default_factory=list)

    def _entries(self) -> list[dict[str, Any]]:
        return [e for e in self.trace if isinstance(e, dict)]

    def kept_start(self) -> list[str]:
        """The models of the stages that kept their start (ended worse than they started, or
        a deformable stage skipped between two contrasts), in order."""
        return [e["model"] for e in self._entries() if e.get("kept_start")]

    def kept_identity(self) -> bool:
        """Whether the linear result was replaced by the identity world map (it aligned the
        images worse than their headers do)."""
        return any(e.get("kept_identity") for e in self._entries())

    def contrast_r(self) -> float | None:
        """The intensity correlation the deformable stage was checked on, when it was."""
        return next((e["contrast_r"] for e in self._entries() if "contrast_r" in e), None)


@dataclass
class KeyMorphExtras(Extras):
    """KeyMorph: keypoints in world mm ``(K, d)`` of both images and the fixed ones mapped by
    the result (``aligned``), the closed form, its lambda, the label each keypoint was trained
    to find (anatomical models), and with a refinement the keypoint affine it started from."""

    keypoints_fixed: np.ndarray | None = None
    keypoints_moving: np.ndarray | None = None
    keypoints_aligned: np.ndarray | None = None
    transform_kind: str = "affine"
    tps_lambda: float | None = None
    keypoint_labels: list[int] | None = None
    keypoint_matrix: np.ndarray | None = None
    refine: str = "none"


@dataclass
class SITRegExtras(Extras):
    """SITReg: the inference variant, the network's grid, its forward and inverse fields
    (normalised, over the grid's extent; coarser for "fast") and each stage's seconds."""

    inference: str = "standard"
    network_grid: Geometry | None = None
    network_fields: tuple[torch.Tensor, torch.Tensor] | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class DIOExtras(Extras):
    """DIO: the transform model the solver fitted to the features, its iteration caps (1/4,
    1/2, 1), the grids the features were computed on (fixed, moving), the feature channels the
    solver compared per level (by factor), the solver's trace and each stage's seconds (linear
    stage, network, solver)."""

    transform_kind: str = "ffd"
    iterations: tuple[int, ...] = ()
    feature_grids: tuple[Geometry, Geometry] | None = None
    channels: dict[float, int] = field(default_factory=dict)
    trace: list[Any] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class AVSMExtras(Extras):
    """AVSM: ``matrix`` is the affine network's world affine (fixed world -> moving world,
    mm); the network grids (fixed's and moving's), the affine steps and vSVF passes run, the
    half-resolution displacement and inverse (normalised, fixed grid) and the time of each
    stage (seconds)."""

    stage: str = "full"
    affine_steps: int = 0
    vsvf_steps: int = 0
    network_grids: tuple[Geometry, Geometry] | None = None
    network_fields: tuple[torch.Tensor, torch.Tensor] | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)


_DISPLACEMENT_LOCK = threading.Lock()


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
    extras: Extras = field(default_factory=Extras)
    elapsed: float | None = None
    peak_memory: int | None = None

    def displacement(self) -> torch.Tensor:
        """The forward transform's world displacement ``T(x) - x`` (mm, ``(d, *fixed.shape)``,
        float32) on the fixed grid: computed once, shared by the written ``transform.nii.gz``
        and the Jacobian metrics."""
        with _DISPLACEMENT_LOCK:  # the writer thread and the metrics may ask at once
            cached = self.__dict__.get("_displacement")
            if cached is None:
                cached = self.transform.displacement(self.fixed)
                self.__dict__["_displacement"] = cached
        return cached

    def jacobian(self) -> torch.Tensor:
        """The forward transform's Jacobian determinant on the fixed grid (mm/mm,
        ``(*fixed.shape)``; <= 0 is folding), from :meth:`displacement`: computed once,
        shared by the quality check, the metrics and the report."""
        cached = self.__dict__.get("_jacobian")
        if cached is None:
            from unireg.spatial.field import displacement_jacobian_determinant

            cached = displacement_jacobian_determinant(self.displacement(), self.fixed)
            self.__dict__["_jacobian"] = cached
        return cached

    def warp(self, image: Image, *, mode: str | None = None) -> Image:
        """Resample any image or label map of the moving subject onto the fixed grid (label
        maps with nearest neighbour unless ``mode="onehot"``)."""
        return resample(image, self.fixed, self.transform, mode=mode)

    @property
    def affine(self) -> AffineTransform | None:
        """The linear part alone (world mm, fixed -> moving), when the method has one."""
        if isinstance(self.transform, AffineTransform):
            return self.transform
        matrix = self.extras.matrix
        return None if matrix is None else AffineTransform(np.asarray(matrix))

    def save(
        self,
        outdir: str | Path,
        *,
        moving_labels: LabelMap | None = None,
        label_interpolation: str = "nearest",
        compresslevel: int | None = None,
    ) -> dict[str, Path]:
        """Write the command-line contract's files into ``outdir`` (created if needed):
        ``warped.nii.gz``, ``warped_labels.nii.gz`` (with ``moving_labels``),
        ``transform.nii.gz`` (the whole forward map as an ITK/ANTs displacement field on the
        fixed grid), ``affine.mat`` (the linear part, when there is one) and
        ``inverse_transform.nii.gz`` (on the moving grid, when there is an inverse).

        ``compresslevel`` (gzip 0-9) applies to every NIfTI; by default images get
        :data:`~unireg.io.files.IMAGE_COMPRESSLEVEL` and fields
        :data:`~unireg.io.files.FIELD_COMPRESSLEVEL`. The files are written in parallel
        threads (gzip, NumPy and torch release the GIL), each atomically; if any write fails,
        the files this call wrote are removed, so a failed save leaves nothing behind."""
        from concurrent.futures import ThreadPoolExecutor

        out = Path(outdir)
        out.mkdir(parents=True, exist_ok=True)
        level = {"compresslevel": compresslevel}
        jobs: list[tuple[str, Any]] = []
        if self.warped is not None:
            warped = self.warped
            jobs.append(("warped", lambda p: save_image(warped, p, **level)))
        if moving_labels is not None:
            warped_labels = self.warp(moving_labels, mode=label_interpolation)
            jobs.append(("warped_labels", lambda p: save_image(warped_labels, p, **level)))
        transform, fixed, moving = self.transform, self.fixed, self.moving
        forward = self.displacement()
        jobs.append(
            (
                "transform",
                lambda p: save_displacement_field(transform, fixed, p, field=forward, **level),
            )
        )
        affine = self.affine
        if affine is not None:
            jobs.append(("affine", lambda p: save_transform(affine, p)))
        if self.inverse is not None:
            inverse = self.inverse
            jobs.append(
                (
                    "inverse_transform",
                    lambda p: save_transform(inverse, p, reference=moving, **level),
                )
            )
        names = {"affine": "affine.mat"}
        paths = {key: out / names.get(key, f"{key}.nii.gz") for key, _ in jobs}
        with ThreadPoolExecutor(max_workers=min(len(jobs), 4)) as pool:
            futures = {key: pool.submit(job, paths[key]) for key, job in jobs}
        failed = [f.exception() for f in futures.values() if f.exception() is not None]
        if failed:
            for key, f in futures.items():
                if f.exception() is None:
                    paths[key].unlink(missing_ok=True)
            raise failed[0]  # type: ignore[misc]
        return paths


def measured_result(
    fixed: Image,
    moving: Image,
    run: Callable[[], tuple[Transform, Transform | None, Extras]],
    device: torch.device | str = "cpu",
) -> RegistrationResult:
    """Run a method (``run`` returns its transform fixed -> moving, its inverse or None, and
    its extras), warp ``moving`` onto ``fixed``'s grid through the transform, and return the
    result with the wall time and peak memory of both, as ANTs' registration reports them
    (its warped image included)."""
    with Measure(device) as measured:
        transform, inverse, extras = run()
        warped = resample(moving, fixed.geometry, transform)
    return RegistrationResult(
        transform=transform, fixed=fixed.geometry, moving=moving.geometry, inverse=inverse,
        warped=warped, extras=extras, elapsed=measured.seconds,
        peak_memory=measured.peak_bytes,
    )  # fmt: skip
