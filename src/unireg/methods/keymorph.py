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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from unireg.data.dataset import Preprocessing
from unireg.io.files import write_atomic
from unireg.io.image import Image, resample
from unireg.nets.keypoints import KeypointDetector
from unireg.profiling import Measure
from unireg.result import RegistrationResult
from unireg.spatial.field import world_points
from unireg.spatial.geometry import Geometry, apply_matrix_np, linear_about
from unireg.spatial.grid import affine_grid, as_matrix, transform_points
from unireg.spatial.keypoints import ThinPlateSpline, fit_keypoint_transform, fit_rigid
from unireg.spatial.transform import AffineTransform, DisplacementFieldTransform, Transform

TRANSFORMS = ("rigid", "affine", "tps")
# intensity refinements of a keypoint alignment (``refine=``): none, or the Gauss-Newton
# affine (same modality) started from the keypoint affine
REFINEMENTS = ("none", "affine-gn")
# test-time rotations of each image at inference (``rotations=``): the keypoints are detected in
# every rotated copy, mapped back and averaged (docs/keymorph_evaluation.md, session 10)
DEFAULT_ROTATIONS = 8


def check_refinement(transform: str, refine: str) -> None:
    """A ``ValueError`` unless ``refine`` is one of :data:`REFINEMENTS` and, when not
    ``"none"``, ``transform`` is ``"affine"`` (what it refines)."""
    if refine not in REFINEMENTS:
        raise ValueError(f"unknown refinement {refine!r}; choose from {REFINEMENTS}")
    if refine != "none" and transform != "affine":
        raise ValueError(f"refine={refine!r} refines an affine alignment, not {transform!r}")


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
        self, image: torch.Tensor, geometry: Geometry, *, coarse: bool = False
    ) -> torch.Tensor:
        """Keypoints ``(B, K, d)`` of ``image`` ``(B, C, *shape)`` in world mm, found by the
        detector (``coarse``: by the coarse stage)."""
        if tuple(image.shape[2:]) != tuple(geometry.shape):
            raise ValueError("the geometry does not match the image's shape")
        if coarse and self.coarse is None:
            raise ValueError("this KeyMorph model has no coarse stage")
        detector = self.coarse if coarse else self.detector
        return self.to_world(detector(image), geometry)

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


# -- inference on images (world space in, RegistrationResult out) ------------------------------


def _detector_input(image: Image, payload: dict) -> tuple[torch.Tensor, Geometry]:
    """Resample an image onto the grid the detector was trained on (spacing, shape, centred on
    the centre of mass, RAS axes) and normalise it: the detector sees what it was trained on
    whatever the input grid; keypoints are mapped back through the world."""
    prep = Preprocessing.from_checkpoint(payload, image.ndim)
    out, _ = prep(image.with_data(image.data[:1].float()))
    assert out is not None
    return out.data.unsqueeze(0), out.geometry


def test_time_rotations(n: int) -> np.ndarray:
    """``(n, 3, 3)`` rotation matrices for test-time averaging: the identity for ``n = 1``,
    otherwise ``n`` rotations drawn uniformly from SO(3) with a fixed seed (1), so a result
    is reproducible and no rotation favours the coordinate axes."""
    from scipy.spatial.transform import Rotation

    if n < 1:
        raise ValueError(f"rotations must be >= 1, got {n}")
    if n == 1:
        return np.eye(3)[None]
    return Rotation.random(n, random_state=1).as_matrix()


def detect_keypoints(
    model: KeyMorph,
    payload: dict,
    image: Image,
    rotations: int = 1,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Keypoints ``(1, K, 3)`` of a 3D ``image`` in its world mm (float64), on the model's
    training grid. ``rotations > 1``: the image is turned in world space about its grid centre
    by each of :func:`test_time_rotations` (its affine changes, its voxels are not resampled
    twice), the keypoints are detected in every copy, turned back and averaged.

    A two-stage model (``model.coarse``): that is how its coarse stage finds them; then the
    image is turned upright about their centre (the inverse rotation of the rigid fit from
    ``model.template`` to them) and the upright detector finds the keypoints, once, turned
    back to the image's world. It also runs on the image unturned; the keypoints returned are
    those of the two that fit the template best (:func:`rigid_residual`)."""
    two_stage = model.coarse is not None
    centre = image.geometry.center_world
    turns = [linear_about(rot, centre) for rot in test_time_rotations(rotations)]
    points = _detect_turned(model, payload, image, turns, device, coarse=two_stage)
    if two_stage:
        template = model.template.detach().double().cpu().numpy()
        # two candidate upright turns: stage 1's, and none (the head as the image's world
        # holds it; stage 1 misjudges brain-extracted heads); stage 2, which knows upright
        # heads only, fits the template best on the head it sees upright
        found = [_detect_turned(model, payload, image, [turn], device)
                 for turn in (upright_turn(template, points), np.eye(4))]  # fmt: skip
        points = min(found, key=lambda f: rigid_residual(template, f))
    return torch.as_tensor(points)[None].to(device)


def rigid_residual(template: np.ndarray, points: np.ndarray) -> float:
    """Mean distance (mm) between ``points`` ``(K, d)`` and ``template`` ``(K, d)`` moved onto
    them by their rigid (Procrustes) fit: how well the points are the template's pattern."""
    fit = fit_rigid(torch.as_tensor(template)[None], torch.as_tensor(points)[None])[0].numpy()
    return float(np.linalg.norm(apply_matrix_np(fit, template) - points, axis=1).mean())


def upright_turn(template: np.ndarray, points: np.ndarray) -> np.ndarray:
    """World matrix ``(d+1, d+1)`` turning a head whose keypoints are ``points`` ``(K, d)``
    (mm) to the orientation of ``template`` ``(K, d)``, about the keypoints' centre: the
    inverse of the rotation of the rigid (Procrustes) fit from the template to the points."""
    fit = fit_rigid(torch.as_tensor(template)[None], torch.as_tensor(points)[None])[0].numpy()
    d = points.shape[1]
    return linear_about(fit[:d, :d].T, points.mean(0))


def _detect_turned(
    model: KeyMorph,
    payload: dict,
    image: Image,
    turns: Sequence[np.ndarray],
    device: torch.device | str,
    coarse: bool = False,
) -> np.ndarray:
    """Mean over the world matrices ``turns`` of the keypoints ``(K, 3)`` (world mm) found in
    ``image`` turned by each (only its affine changes), each mapped back by the turn's
    inverse."""
    found = []
    for turn in turns:
        x, geom = _detector_input(image.with_data(image.data, turn @ image.geometry.affine),
                                  payload)  # fmt: skip
        points = model.keypoints_world(x.to(device), geom, coarse=coarse)
        found.append(apply_matrix_np(np.linalg.inv(turn), points[0].double().cpu().numpy()))
    return np.mean(found, axis=0)


def register_keymorph(
    fixed: Image,
    moving: Image,
    *,
    model: KeyMorph,
    payload: dict,
    transform: str = "affine",
    lam: float = 0.1,
    refine: str = "none",
    rotations: int = DEFAULT_ROTATIONS,
    device: torch.device | str = "cpu",
) -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` with a KeyMorph ``model`` and its checkpoint
    ``payload`` (:func:`unireg.training.checkpoint.load_keymorph`).

    Keypoints are detected once per image (on the model's training grid), aligned in world
    mm, and the chosen closed form (rigid, affine, or TPS with ``lam``) gives the transform
    fixed -> moving: an :class:`AffineTransform`, or for TPS a displacement field on the
    fixed grid. ``extras`` hold the keypoints (world mm) of both images and the aligned ones
    (the fixed keypoints mapped by the returned transform).

    ``refine="affine-gn"`` (affine only, same modality) is not KeyMorph: the keypoint affine
    is the start of :func:`~unireg.solvers.gauss_newton.affine_gauss_newton` on the images,
    whose result is returned (the keypoint one is kept in ``extras["keypoint_matrix"]``): the
    keypoints give robustness to any head orientation, the intensities the accuracy.

    ``rotations``: each image's keypoints are the average over that many test-time rotations
    (:func:`detect_keypoints`; 1: one detection per image).
    """
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; choose from {TRANSFORMS}")
    check_refinement(transform, refine)
    if fixed.ndim != 3 or moving.ndim != 3:
        raise ValueError("the KeyMorph models are 3D")
    dev = torch.device(device)
    with Measure(dev) as measured, torch.no_grad():
        model = model.to(dev).eval()
        fk = detect_keypoints(model, payload, fixed, rotations, dev)
        mk = detect_keypoints(model, payload, moving, rotations, dev)
        alignment = model.align(fk, mk, fixed.geometry, transform, lam)
        assert isinstance(alignment, KeypointAlignment)
        if transform == "tps":  # solved in float64, evaluated on the grid in float32
            assert isinstance(alignment.transform, ThinPlateSpline)
            grid_tps = replace(alignment, transform=alignment.transform.to(torch.float32))
            pts = world_points(fixed.geometry, dtype=torch.float32, device=dev).reshape(1, -1, 3)
            moved = grid_tps.map_world(pts)
            disp = (moved - pts).reshape(*fixed.shape, 3).permute(3, 0, 1, 2).float().cpu()
            result_tf: Transform = DisplacementFieldTransform(disp, fixed.geometry)
            matrix = None
        else:
            matrix = alignment.world_matrix()[0].cpu().numpy()
            result_tf = AffineTransform(matrix)
        aligned = alignment.map_world(fk)[0].cpu().numpy()
        keypoint_matrix = matrix
        if refine == "affine-gn":
            from unireg.solvers.gauss_newton import affine_gauss_newton

            result_tf, _ = affine_gauss_newton(fixed, moving, init=result_tf, device=dev)
            matrix = result_tf.matrix.numpy()
            aligned = fk[0].cpu().numpy() @ matrix[:3, :3].T + matrix[:3, 3]
    warped = resample(moving, fixed.geometry, result_tf)
    inverse = result_tf.inverse() if isinstance(result_tf, AffineTransform) else None
    refined = "" if refine == "none" else f", refined by {refine}"
    extras = {
        "method": f"keymorph ({transform}{f', lambda {lam:g}' if transform == 'tps' else ''}"
        f"{refined})",
        "keypoints_fixed": fk[0].cpu().numpy(),
        "keypoints_moving": mk[0].cpu().numpy(),
        "keypoints_aligned": aligned,
        "transform_kind": transform,
        "tps_lambda": lam if transform == "tps" else None,
    }
    labels = (payload.get("extra") or {}).get("anatomical_labels")
    if labels is not None and len(labels) == len(extras["keypoints_fixed"]):
        extras["keypoint_labels"] = [int(v) for v in labels]  # keypoint k: centroid of label k
    if matrix is not None:
        extras["matrix"] = matrix
    if refine != "none":
        extras["keypoint_matrix"] = keypoint_matrix
        extras["refine"] = refine
    return RegistrationResult(
        transform=result_tf, fixed=fixed.geometry, moving=moving.geometry, inverse=inverse,
        warped=warped, extras=extras, elapsed=measured.seconds,
        peak_memory=measured.peak_bytes,
    )  # fmt: skip


def write_keypoints_csv(result: RegistrationResult, path: str | Path) -> Path:
    """``keypoints.csv``: per keypoint, the fixed, moving and aligned (the fixed keypoint
    mapped by the transform) positions in world mm (RAS), the residual to the moving
    keypoint and, for a model trained on anatomical keypoints, the label whose centroid the
    keypoint was trained to be (``label``)."""
    fk = np.asarray(result.extras["keypoints_fixed"])
    mk = np.asarray(result.extras["keypoints_moving"])
    ak = np.asarray(result.extras["keypoints_aligned"])
    path = Path(path)
    labels = result.extras.get("keypoint_labels")
    rows = ["index,fixed_x,fixed_y,fixed_z,moving_x,moving_y,moving_z,"
            "aligned_x,aligned_y,aligned_z,residual_mm" + (",label" if labels else "")]  # fmt: skip
    for i, (f, m, a) in enumerate(zip(fk, mk, ak, strict=True)):
        vals = [*f, *m, *a, float(np.linalg.norm(a - m))]
        rows.append(f"{i}," + ",".join(f"{v:.4f}" for v in vals)
                    + (f",{labels[i]}" if labels else ""))  # fmt: skip
    write_atomic(path, lambda tmp: Path(tmp).write_text("\n".join(rows) + "\n"))
    return path
