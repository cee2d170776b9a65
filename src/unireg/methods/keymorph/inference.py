"""KeyMorph on images: keypoints detected on the model's training grid (optionally averaged over
test-time rotations, or in two stages), aligned in world mm by the chosen closed form, and the
result built by the shared pipeline (:mod:`unireg.methods.pipeline`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unireg.io.files import write_atomic
from unireg.io.image import Image
from unireg.methods.base import OptionError
from unireg.methods.keymorph import DEFAULT_ROTATIONS, TRANSFORMS, KeyMorphOptions, check_refinement
from unireg.methods.keymorph.model import KeyMorph, KeypointAlignment
from unireg.methods.pipeline import (
    LearnedMethod,
    network_dtype,
    network_input,
    turned_network_grids,
)
from unireg.result import KeyMorphExtras, RegistrationResult, measured_result
from unireg.spatial.field import world_points
from unireg.spatial.geometry import apply_matrix_np, linear_about
from unireg.spatial.keypoints import ThinPlateSpline, fit_rigid
from unireg.spatial.transform import AffineTransform, DisplacementFieldTransform, Transform
from unireg.training.checkpoint import Checkpoint


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


# when neither of a two-stage detection's upright turns gives keypoints within this mean
# distance (mm) of the template's pattern (:func:`rigid_residual`), the turns that take the
# image's intensity principal axes onto the template's (:func:`moment_turns`) are tried too.
# Chosen on IXI training pairs (6 ordered pairs; shifts none, skullstrip, synth,
# skullstrip+synth, aniso; 0 and 90 degrees; thresholds 0-8 mm and never): the largest mean
# Dice among the thresholds losing at most 0.01 in every group, 0.304 -> 0.340 (synth at 90
# degrees 0.012 -> 0.113, skullstrip+synth 0.009 -> 0.272, every other group unchanged);
# lower thresholds let the moment turns win at 0 degrees on synthetic contrasts, and lose there.
MOMENT_TURN_RESIDUAL_MM = 8.0


def detect_keypoints(
    model: KeyMorph,
    checkpoint: Checkpoint,
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
    those of the two that fit the template best (:func:`rigid_residual`). When neither fits
    within :data:`MOMENT_TURN_RESIDUAL_MM`, the image turned by each of :func:`moment_turns`
    is a candidate too."""
    return detect_keypoints_many(model, checkpoint, [image], rotations, device)[0]


def detect_keypoints_many(
    model: KeyMorph,
    checkpoint: Checkpoint,
    images: Sequence[Image],
    rotations: int = 1,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """:func:`detect_keypoints` of several images, with every turned copy of every image in
    one detector batch per stage (the same keypoints as one image at a time)."""
    found = keypoint_candidates_many(model, checkpoint, images, rotations, device)
    return [torch.as_tensor(c.points[c.pick])[None].to(device) for c in found]


@dataclass(frozen=True)
class KeypointCandidates:
    """One image's candidate keypoint sets ``(K, 3)`` (world mm), each found with the head
    turned to another orientation hypothesis, their :func:`rigid_residual` (mm), and ``pick``:
    the index :func:`detect_keypoints` returns."""

    points: list[np.ndarray]
    residuals: list[float]
    pick: int


def keypoint_candidates_many(
    model: KeyMorph,
    checkpoint: Checkpoint,
    images: Sequence[Image],
    rotations: int = 1,
    device: torch.device | str = "cpu",
    every_turn: bool = False,
    dtype: torch.dtype = torch.float32,
) -> list[KeypointCandidates]:
    """Each image's :class:`KeypointCandidates`. A one-stage model has one. A two-stage
    model: stage 1's upright turn and no turn, and the 4 :func:`moment_turns` when neither of
    those fits the template within :data:`MOMENT_TURN_RESIDUAL_MM` or ``every_turn``. The
    detectors' convolutions run in ``dtype``."""
    two_stage = model.coarse is not None
    rots = test_time_rotations(rotations)
    jobs = [(im, [linear_about(r, im.geometry.center_world) for r in rots]) for im in images]
    points = _detect_many(model, checkpoint, jobs, device, coarse=two_stage, dtype=dtype)
    if not two_stage:
        return [KeypointCandidates([p], [0.0], 0) for p in points]
    template = model.template.detach().double().cpu().numpy()
    n = len(images)
    # two candidate upright turns: stage 1's, and none (the head as the image's world holds
    # it; stage 1 misjudges brain-extracted heads); stage 2, which knows upright heads only,
    # fits the template best on the head it sees upright
    upright = [(im, [upright_turn(template, p)]) for im, p in zip(images, points, strict=True)]
    found = _detect_many(model, checkpoint, [*upright, *[(im, [np.eye(4)]) for im in images]],
                         device, dtype=dtype)  # fmt: skip
    sets = [[found[i], found[n + i]] for i in range(n)]
    residuals = [[rigid_residual(template, f) for f in s] for s in sets]
    picks = [int(np.argmin(r)) for r in residuals]
    poor = [i for i in range(n) if residuals[i][picks[i]] > MOMENT_TURN_RESIDUAL_MM]
    wanted = range(n) if every_turn else poor
    if wanted:  # the principal axes' turns (4 per image) in one more batch
        turned = [(i, t) for i in wanted for t in moment_turns(images[i], template)]
        jobs = [(images[i], [t]) for i, t in turned]
        more = _detect_many(model, checkpoint, jobs, device, dtype=dtype)
        for (i, _), f in zip(turned, more, strict=True):
            sets[i].append(f)
            residuals[i].append(rigid_residual(template, f))
    for i in poor:
        picks[i] = int(np.argmin(residuals[i]))
    return [KeypointCandidates(s, r, p) for s, r, p in zip(sets, residuals, picks, strict=True)]


# a pair's orientation hypotheses compared by the images' similarity: each image's pick and its
# candidates within this rigid residual (mm). Chosen on IXI training pairs (6 ordered pairs;
# shifts none, skullstrip, synth, skullstrip+synth, aniso; 0 and 90 degrees; 0-12 mm and any;
# margins 0-10 %; forward, backward and mean mutual information): the largest mean Dice among
# the settings losing at most 0.01 in every group, 0.340 -> 0.375 (skullstrip at 90 degrees
# 0.234 -> 0.365, skullstrip+synth 0.367 -> 0.427 and 0.272 -> 0.340 at 0 and 90 degrees; no
# group lost). From 5 mm on, wrongly turned heads enter and win on synthetic contrasts.
PAIR_RESIDUAL_MM = 4.0
# when both images show a brain alone, every pair of candidates is a hypothesis and those whose
# brain outlines overlap (foreground Dice) within this of the best are compared by mutual
# information. Chosen on the same training pairs and groups by the same criterion, against
# the residual limit, both mutual informations, the outline alone, their product and margins
# 0.01-0.05, with and without the brain-alone condition: mean Dice 0.375 -> 0.408 (skullstrip
# at 90 degrees 0.365 -> 0.428, synth 0.321 -> 0.342 and 0.099 -> 0.340 at 0 and 90,
# skullstrip+synth at 90 0.340 -> 0.352; no group lost). With skull, neck and the field of
# view's edges in the foreground the outlines mislead (none at 90 degrees -0.027).
OUTLINE_MARGIN = 0.01


def choose_pair_keypoints(
    model: KeyMorph,
    fixed: Image,
    moving: Image,
    fixed_candidates: KeypointCandidates,
    moving_candidates: KeypointCandidates,
    brains: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed and moving keypoints ``(1, K, 3)`` (world mm) of the pair of candidates
    whose affine alignment gives the largest mutual information between the images
    (:func:`~unireg.quality.similarity_scores`), among each image's pick and its candidates
    within :data:`PAIR_RESIDUAL_MM`; the picks when no other pair scores higher. ``brains``
    (both images show a brain alone): among every pair of candidates whose alignment overlaps
    the brains' outlines (:func:`~unireg.quality.foreground_overlaps`) within
    :data:`OUTLINE_MARGIN` of the best."""
    from unireg.quality import foreground_overlaps, similarity_scores

    def kept(c: KeypointCandidates) -> list[int]:
        if brains:
            return [c.pick] + [i for i in range(len(c.points)) if i != c.pick]
        return [c.pick] + [i for i, r in enumerate(c.residuals)
                           if i != c.pick and r <= PAIR_RESIDUAL_MM]  # fmt: skip

    fc, mc = fixed_candidates, moving_candidates
    combos = [(i, j) for i in kept(fc) for j in kept(mc)]
    pts = [(torch.as_tensor(fc.points[i])[None], torch.as_tensor(mc.points[j])[None])
           for i, j in combos]  # fmt: skip
    if len(combos) == 1:
        return pts[0]
    maps: dict[str, Transform | None] = {}
    for n, (f, m) in enumerate(pts):
        alignment = model.align(f, m, fixed.geometry, "affine", 0.0)
        assert isinstance(alignment, KeypointAlignment)
        maps[str(n)] = AffineTransform(alignment.world_matrix()[0].cpu().numpy())
    if brains:
        overlaps = foreground_overlaps(fixed, moving, maps, step=2)
        top = max(overlaps.values())
        maps = {k: v for k, v in maps.items() if overlaps[k] >= top - OUTLINE_MARGIN}
    scores = similarity_scores(fixed, moving, maps)
    best = max(scores, key=lambda k: scores[k])  # the first (the picks) on ties
    return pts[int(best)]


def shows_brains(fixed: Image, moving: Image, device: torch.device | str = "cpu") -> bool:
    """Whether both images show a brain alone
    (:func:`~unireg.methods.extraction.inference.is_brain_extracted`; the brain-mask network
    runs only on an image with a zeroed background)."""
    from unireg.methods.extraction.inference import is_brain_extracted

    return all(is_brain_extracted(image, device=device) for image in (fixed, moving))


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


def moment_turns(image: Image, template: np.ndarray) -> list[np.ndarray]:
    """The 4 world matrices ``(d+1, d+1)`` that turn ``image`` about its intensity centre of
    mass so that its intensity principal axes (:func:`~unireg.solvers.linear.moments`, first
    channel) lie along the principal axes of the ``template`` keypoints ``(K, d)`` (mm), in the
    same order of variance: one per choice of the axes' signs that is a proper rotation."""
    from unireg.solvers.linear import axes_rotations, moments

    com, axes, _ = moments(image.data[:1].unsqueeze(0).double(), image.geometry)
    centred = torch.as_tensor(template, dtype=torch.float64)
    centred = centred - centred.mean(0)
    _, template_axes = torch.linalg.eigh(centred.T @ centred)  # ascending, as moments'
    return [linear_about(rot.numpy(), com.numpy()) for rot in axes_rotations(axes, template_axes)]


def _detect_many(
    model: KeyMorph,
    checkpoint: Checkpoint,
    jobs: Sequence[tuple[Image, Sequence[np.ndarray]]],
    device: torch.device | str,
    coarse: bool = False,
    dtype: torch.dtype = torch.float32,
) -> list[np.ndarray]:
    """For each ``(image, turns)``: the mean over the world matrices ``turns`` of the
    keypoints ``(K, 3)`` (world mm) found in the image turned by each (only its affine
    changes), each mapped back by the turn's inverse. Every turned copy of every image goes
    through the detector in one batch (it sees each copy alone: no layer mixes a batch)."""
    inputs, geometries, owners, inverses = [], [], [], []
    for index, (image, turns) in enumerate(jobs):
        # the detector sees what it was trained on whatever the input grid: each turned copy
        # on the network's grid (centred on the head), normalised; keypoints mapped back
        # through the world
        grids = turned_network_grids(checkpoint, image, turns)
        for turn, grid in zip(turns, grids, strict=True):
            turned = image.with_data(image.data, turn @ image.geometry.affine)
            inputs.append(network_input(turned, grid))
            geometries.append(grid)
            owners.append(index)
            inverses.append(np.linalg.inv(turn))
    batch = torch.cat(inputs).to(device)
    world = model.keypoints_world(batch, geometries, coarse=coarse, dtype=dtype)
    world = world.detach().double().cpu().numpy()
    found: list[list[np.ndarray]] = [[] for _ in jobs]
    for i, inverse in enumerate(inverses):
        found[owners[i]].append(apply_matrix_np(inverse, world[i]))
    return [np.mean(f, axis=0) for f in found]


def register_keymorph(
    fixed: Image,
    moving: Image,
    *,
    model: KeyMorph,
    checkpoint: Checkpoint,
    transform: str = "affine",
    lam: float = 0.1,
    refine: str = "none",
    rotations: int = DEFAULT_ROTATIONS,
    device: torch.device | str = "cpu",
    keypoints: tuple[torch.Tensor, torch.Tensor] | None = None,
    precision: str = "float32",
    brain: str = "auto",
) -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` with a KeyMorph ``model`` and its ``checkpoint``
    (:func:`unireg.methods.load_model`).

    Keypoints are detected once per image (on the model's training grid; a two-stage model's
    orientation hypotheses chosen for the pair by :func:`choose_pair_keypoints`), aligned in
    world mm, and the chosen closed form (rigid, affine, or TPS with ``lam``) gives the transform
    fixed -> moving: an :class:`AffineTransform`, or for TPS a displacement field on the
    fixed grid. ``extras`` (:class:`~unireg.result.KeyMorphExtras`) hold the keypoints (world
    mm) of both images and the aligned ones (the fixed keypoints mapped by the result).

    ``refine="affine-gn"`` (affine only, same modality) is not KeyMorph: the keypoint affine
    is the start of :func:`~unireg.solvers.gauss_newton.affine_gauss_newton` on the images,
    whose result is returned (the keypoint one is kept as ``extras.keypoint_matrix``): the
    keypoints give robustness to any head orientation, the intensities the accuracy.

    ``rotations``: each image's keypoints are the average over that many test-time rotations
    (:func:`detect_keypoints`; 1: one detection per image). ``keypoints``: the fixed and
    moving keypoints already detected (:func:`register_keymorph_many`). ``precision``: the
    detectors' number format (:func:`~unireg.methods.pipeline.network_dtype`). ``brain``:
    ``"auto"`` reads whether both images show a brain alone (:func:`shows_brains`), which
    changes how the pair's orientation is chosen; ``"off"`` does not.
    """
    if transform not in TRANSFORMS:
        raise OptionError(f"unknown transform {transform!r}; choose from {TRANSFORMS}")
    check_refinement(transform, refine)
    if fixed.ndim != 3 or moving.ndim != 3:
        raise ValueError("the KeyMorph models are 3D")
    dev = torch.device(device)

    @torch.no_grad()
    def run() -> tuple[Transform, Transform | None, KeyMorphExtras]:
        net = model.to(dev).eval()
        if keypoints is None:
            fc, mc = keypoint_candidates_many(
                net, checkpoint, [fixed, moving], rotations, dev, every_turn=True,
                dtype=network_dtype(precision, dev),
            )  # fmt: skip
            brains = brain == "auto" and shows_brains(fixed, moving, dev)
            keys = choose_pair_keypoints(net, fixed, moving, fc, mc, brains)
        else:
            keys = keypoints
        fk, mk = (k.to(dev) for k in keys)
        alignment = net.align(fk, mk, fixed.geometry, transform, lam)
        assert isinstance(alignment, KeypointAlignment)
        matrix: np.ndarray | None = None
        result_tf: Transform
        if transform == "tps":  # solved in float64, evaluated on the grid in float32
            assert isinstance(alignment.transform, ThinPlateSpline)
            grid_tps = replace(alignment, transform=alignment.transform.to(torch.float32))
            pts = world_points(fixed.geometry, dtype=torch.float32, device=dev).reshape(1, -1, 3)
            moved = grid_tps.map_world(pts)
            disp = (moved - pts).reshape(*fixed.shape, 3).permute(3, 0, 1, 2).float().cpu()
            result_tf = DisplacementFieldTransform(disp, fixed.geometry)
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
        refined = "" if refine == "none" else f", refined by {refine}"
        lam_text = f", lambda {lam:g}" if transform == "tps" else ""
        labels = checkpoint.extra.get("anatomical_labels")
        if labels is not None and len(labels) != fk.shape[1]:
            labels = None
        extras = KeyMorphExtras(
            method=f"keymorph ({transform}{lam_text}{refined})", matrix=matrix,
            keypoints_fixed=fk[0].cpu().numpy(), keypoints_moving=mk[0].cpu().numpy(),
            keypoints_aligned=aligned, transform_kind=transform,
            tps_lambda=lam if transform == "tps" else None,
            # keypoint k: the centroid of label k
            keypoint_labels=None if labels is None else [int(v) for v in labels],
            keypoint_matrix=keypoint_matrix if refine != "none" else None, refine=refine,
        )  # fmt: skip
        inverse = result_tf.inverse() if isinstance(result_tf, AffineTransform) else None
        return result_tf, inverse, extras

    return measured_result(fixed, moving, run, dev)


def register_keymorph_many(
    pairs: Sequence[tuple[Image, Image]],
    *,
    model: KeyMorph,
    checkpoint: Checkpoint,
    rotations: int = DEFAULT_ROTATIONS,
    device: torch.device | str = "cpu",
    precision: str = "float32",
    brain: str = "auto",
    **options: Any,
) -> list[RegistrationResult]:
    """:func:`register_keymorph` for several ``(fixed, moving)`` pairs: the keypoints of all
    their images detected in one batch per detector stage, then each pair's closed form (and
    refinement). Each result's time is its own alignment plus its share of the detection."""
    for fixed, moving in pairs:
        if fixed.ndim != 3 or moving.ndim != 3:
            raise ValueError("the KeyMorph models are 3D")
    dev = torch.device(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        net = model.to(dev).eval()
        images = [im for pair in pairs for im in pair]
        found = keypoint_candidates_many(net, checkpoint, images, rotations, dev, every_turn=True,
                                         dtype=network_dtype(precision, dev))  # fmt: skip
        keys = [choose_pair_keypoints(net, fixed, moving, found[2 * i], found[2 * i + 1],
                                      brain == "auto" and shows_brains(fixed, moving, dev))
                for i, (fixed, moving) in enumerate(pairs)]  # fmt: skip
    share = (time.perf_counter() - t0) / max(len(pairs), 1)
    out = []
    for (fixed, moving), pair_keys in zip(pairs, keys, strict=True):
        result = register_keymorph(
            fixed, moving, model=model, checkpoint=checkpoint, rotations=rotations, device=dev,
            keypoints=pair_keys, brain=brain, **options,
        )  # fmt: skip
        if result.elapsed is not None:
            result = replace(result, elapsed=result.elapsed + share)
        out.append(result)
    return out


def write_keypoints_csv(result: RegistrationResult, path: str | Path) -> Path:
    """``keypoints.csv``: per keypoint, the fixed, moving and aligned (the fixed keypoint
    mapped by the transform) positions in world mm (RAS), the residual to the moving
    keypoint and, for a model trained on anatomical keypoints, the label whose centroid the
    keypoint was trained to be (``label``)."""
    extras = result.extras
    if not isinstance(extras, KeyMorphExtras) or extras.keypoints_fixed is None:
        raise ValueError("keypoints.csv needs a KeyMorph result")
    fk, mk = np.asarray(extras.keypoints_fixed), np.asarray(extras.keypoints_moving)
    ak = np.asarray(extras.keypoints_aligned)
    path = Path(path)
    labels = extras.keypoint_labels
    rows = ["index,fixed_x,fixed_y,fixed_z,moving_x,moving_y,moving_z,"
            "aligned_x,aligned_y,aligned_z,residual_mm" + (",label" if labels else "")]  # fmt: skip
    for i, (f, m, a) in enumerate(zip(fk, mk, ak, strict=True)):
        vals = [*f, *m, *a, float(np.linalg.norm(a - m))]
        rows.append(f"{i}," + ",".join(f"{v:.4f}" for v in vals)
                    + (f",{labels[i]}" if labels else ""))  # fmt: skip
    write_atomic(path, lambda tmp: Path(tmp).write_text("\n".join(rows) + "\n"))
    return path


class KeyMorphMethod(LearnedMethod):
    """KeyMorph behind the :class:`~unireg.methods.base.Method` protocol: the model loaded
    once, each pair registered with the options' closed form."""

    options: KeyMorphOptions

    def run(self, fixed: Image, moving: Image) -> RegistrationResult:
        o = self.options
        assert isinstance(self.model, KeyMorph)
        return register_keymorph(
            fixed, moving, model=self.model, checkpoint=self.checkpoint, transform=o.transform,
            lam=o.lam, refine=o.refine, rotations=o.rotations, device=self.device,
            precision=o.precision, brain=o.brain,
        )  # fmt: skip

    def register_many(self, pairs: Sequence[tuple[Image, Image]]) -> list[RegistrationResult]:
        """Several pairs with their keypoints detected in one batch
        (:func:`register_keymorph_many`); what ``unireg batch --batch-size`` uses."""
        o = self.options
        assert isinstance(self.model, KeyMorph)
        return register_keymorph_many(
            pairs, model=self.model, checkpoint=self.checkpoint, transform=o.transform,
            lam=o.lam, refine=o.refine, rotations=o.rotations, device=self.device,
            precision=o.precision, brain=o.brain,
        )  # fmt: skip
