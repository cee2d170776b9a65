"""Training-free registration of two images: presets and the image-level ``register``.

Methods (each chains the linear stages before the deformable one):

==========  ======================================================================
``rigid``   moments initialisation (or ``init="search"``), rigid, MI (coarse levels); then
            rigid at the finer levels of ``affine``: MI, then (same modality) LNCC
``affine``  rigid (coarse levels), then affine, MI; then (same modality) an affine
            refinement with LNCC
``affine-gn`` same modality only: affine by damped Gauss-Newton on locally normalised
            intensities from the centres of mass (:mod:`unireg.solvers.gauss_newton`);
            3.5x faster than ``affine`` on 2 mm heads, not stage-based
``syn``     affine, then greedy compositive diffeomorphic (``deformable="greedy"``, the
            default) or symmetric diffeomorphic SVF (``deformable="svf"``: slower, gives
            the inverse by construction), LNCC
``bspline`` affine, then cubic B-spline free-form deformation, LNCC + bending energy
``ffd``     affine, then free-form displacement with Gaussian smoothing, LNCC
==========  ======================================================================

Presets (``fast`` / ``accurate``) set the pyramid and iteration counts; levels are given as
downsampling factors of the fixed grid, so they mean the same thing at any resolution. The
similarity of the deformable stage is LNCC (window 5 at 2 mm and coarser, 7 at finer grids)
for the same modality and MI for multi-modal pairs (``multimodal=True``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch

from unireg.errors import DimensionalityError
from unireg.io.image import Image, LabelMap, check_same_grid, normalize_intensity, resample
from unireg.result import RegistrationResult, SolverExtras, measured_result
from unireg.solvers.gauss_newton import GN_LEVELS, affine_gauss_newton
from unireg.solvers.solver import (
    DENSE,
    LabelPrompt,
    LandmarkPrompt,
    Level,
    SolveResult,
    Stage,
    fit_levels,
    solve,
)
from unireg.spatial.field import displacement_to_world
from unireg.spatial.filters import box_sum
from unireg.spatial.geometry import Geometry
from unireg.spatial.inversion import invert_covering
from unireg.spatial.transform import (
    AffineTransform,
    CompositeTransform,
    DisplacementFieldTransform,
    Transform,
)

METHODS = ("rigid", "affine", "affine-gn", "syn", "bspline", "ffd")
PRESETS = ("fast", "accurate")

# linear stages: rigid and affine with MI (global, sampled voxels), then, for the same
# modality, an affine refinement with LNCC ("refine"); multimodal pairs keep MI throughout
# ("affine_mi"). Chosen on IXI *training* pairs: MI on heads with skull reaches its optimum a
# little away from the best brain overlap, and the local similarity brings it back.
_LINEAR_LEVELS = {
    "fast": {
        "rigid": [(8, 30)],
        "affine": [(4, 60)],
        "refine": [(2, 20)],
        "affine_mi": [(4, 60), (2, 40)],
    },
    "accurate": {
        "rigid": [(8, 100), (4, 60)],
        "affine": [(4, 100), (2, 60)],
        "refine": [(2, 40), (1, 20)],
        "affine_mi": [(4, 100), (2, 60), (1, 30)],
    },
}
_DENSE_LEVELS = {
    "fast": [(4, 80), (2, 40)],  # the full-resolution field is the level-2 one upsampled
    "accurate": [(4, 100), (2, 60), (1, 20)],
}
# the fast deformable LNCC stages on grids of COARSE_GRID_MM voxels or coarser end with a few
# full-resolution iterations after a shorter 1/2 level. Chosen per method on 12 ordered IXI
# training pairs (2 mm) under five shifts by rules fixed beforehand (at most 1.15x the time of
# 80,40,0, no group 0.002 Dice below it, no more folding; the fastest within 0.003 of the
# best): greedy syn mean Dice 0.712 -> 0.732, self-warp end-point error 0.38 -> 0.27 mm (0.52 ->
# 0.30 brain-extracted), 1.09x the time; bspline 0.706 -> 0.728, 0.55 -> 0.37 mm, folding
# 0.74 -> 0.27 % of inter-subject grids, 0.97x the time; ffd 0.714 -> 0.730, 0.52 -> 0.38 mm,
# 1.08x the time. Finer grids and syn's SVF keep 80,40,0, multimodal stages their own levels
# (a finer grid's 1/2 level is already as fine in mm; the rules measured LNCC on 2 mm grids).
_FAST_FULL_LEVELS = {
    "syn": [(4, 60), (2, 10), (1, 2)],
    "bspline": [(4, 60), (2, 10), (1, 3)],
    "ffd": [(4, 80), (2, 10), (1, 1)],
}
# voxels of at least this size (mm): LNCC window 5 (else 7) and the fast full-resolution levels
COARSE_GRID_MM = 1.5


# the LNCC stages (linear refinement and deformable) compare the images over the fixed image's
# foreground eroded by this many voxels (see foreground_mask); the MI stages compare them over
# the whole grid. Chosen on
# IXI training pairs: the erosion among -1 (everywhere), 0 and 2 (8 inter-subject pairs, 8 of
# them skull-stripped, 7 skull-stripped subjects against themselves deformed by 4-8 mm: the best
# mean Dice of rigid and affine among the settings that lose at most 0.005 in any group for
# rigid, affine or syn; 2 had the best mean but lost 0.027 for rigid on skull-stripped pairs);
# then which stages use it, with 8 skull-stripped pairs of a synthetic moving contrast and 7
# skull-on self-warped subjects added (the same rule, against every stage on the foreground):
# every stage on the foreground 0.521 mean Dice, MI stages on the whole grid 0.561 (0.234 ->
# 0.421 for rigid and 0.289 -> 0.479 for affine on the synthetic contrast, at most 0.002 lost in
# any group); the foreground dilated by 2 or 4 voxels lost 0.012 and 0.011. The deformable
# LNCC stage on the foreground too (the same groups and rule, syn): skull-stripped self-warps
# 0.810 -> 0.522 mm end-point error, 0.847 -> 0.891 Dice; the other groups within 0.001 or up
# to 0.002 higher
FOREGROUND_ERODE = 0


def foreground_mask(image: Image, erode: int = FOREGROUND_ERODE) -> torch.Tensor:
    """The voxels of ``image`` (first channel) above its minimum, eroded by ``erode`` voxels
    (a box of ``2 erode + 1``), as ``(1, 1, *shape)`` booleans on the image's grid: the head or
    brain of a scan whose background is exactly its minimum (zero-filled or brain-extracted);
    nearly every voxel of a scan with background noise. All voxels if erosion leaves none."""
    x = image.data[:1].unsqueeze(0)
    m = (x > x.min()).float()
    if erode > 0:
        k = 2 * erode + 1
        m = (box_sum(m, k, padding="replicate") > k ** (x.ndim - 2) - 0.5).float()
    out = m > 0.5
    return out if bool(out.any()) else torch.ones_like(out)


def preset_stages(
    method: str = "syn",
    preset: str = "fast",
    *,
    shape: Sequence[int] | None = None,
    multimodal: bool = False,
    init: str = "moments",
    deformable: str = "greedy",
    window: int | None = None,
    iterations: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
) -> list[Stage]:
    """The stages of a named method and preset (see the module docstring), with the pyramid
    fitted to the fixed image ``shape`` when given (see :func:`fit_levels`). ``iterations``
    (three counts for 1/4, 1/2 and full resolution; 0 skips a level) replaces the preset's
    levels of the deformable stage. ``spacing`` is the fixed voxel size (mm): on grids of at
    least :data:`COARSE_GRID_MM` (or when it is not given) the LNCC ``window`` defaults to 5
    voxels (else 7) and the fast greedy ``syn``, ``bspline`` and ``ffd`` end with a short
    full-resolution level."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if method == "affine-gn":
        raise ValueError("affine-gn is not made of solver stages (see solvers.gauss_newton)")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {PRESETS}")
    coarse_grid = spacing is None or min(spacing) >= COARSE_GRID_MM
    if window is None:
        window = 5 if coarse_grid else 7
    mi = {"bins": 32}

    def fit(levels: Sequence[tuple[float, int]]) -> list[Level]:
        return fit_levels(levels, shape) if shape is not None else [Level(*lv) for lv in levels]

    lin = _LINEAR_LEVELS[preset]
    rigid = Stage(
        "rigid", fit(lin["rigid"]), loss="mi", loss_options=mi,
        samples=4096, lr=0.02, init=init, search_step=60.0, foreground=False,
    )  # fmt: skip
    # dense MI: 16 bins (half the Parzen work of 32; the affine stages keep 32)
    sim = ("mi", {"bins": 16}) if multimodal else ("lncc", {"window": window})
    # after the coarse rigid start, the linear model of the method (rigid on its own, else
    # affine) is refined at the finer levels: MI, then (one modality) LNCC
    kind = "rigid" if method == "rigid" else "affine"
    if multimodal:
        linear = [
            rigid,
            Stage(kind, fit(lin["affine_mi"]), loss="mi", loss_options=mi, samples=4096,
                  lr=0.01, foreground=False),
        ]  # fmt: skip
    else:
        linear = [
            rigid,
            Stage(kind, fit(lin["affine"]), loss="mi", loss_options=mi, samples=4096, lr=0.01,
                  foreground=False),
            Stage(kind, fit(lin["refine"]), loss=sim[0], loss_options=sim[1], lr=0.005),
        ]  # fmt: skip
    if method in ("rigid", "affine"):
        if iterations is not None:
            raise ValueError(f"iterations set the deformable stage's levels; {method} has none")
        return linear
    dense_levels = _DENSE_LEVELS[preset]
    svf = method == "syn" and deformable == "svf"
    if preset == "fast" and coarse_grid and not svf and method in _FAST_FULL_LEVELS:
        dense_levels = _FAST_FULL_LEVELS[method]
    if multimodal and preset == "fast":  # dense MI costs ~5x LNCC per voxel: fewer fine steps
        dense_levels = [(4, 80), (2, 15)]
    if iterations is not None:
        if len(iterations) != 3 or min(iterations) < 0 or max(iterations) == 0:
            raise ValueError(f"iterations: three counts >= 0 for 1/4, 1/2, 1/1, got {iterations}")
        dense_levels = [(f, int(n)) for f, n in zip((4, 2, 1), iterations, strict=True) if n > 0]
    levels = fit(dense_levels)
    if method == "syn":
        if deformable not in ("svf", "greedy"):
            raise ValueError(f"syn's deformable model is svf or greedy, got {deformable!r}")
        greedy = deformable == "greedy"
        # the greedy field's smoothing (voxels): 1.25 for the fast LNCC stage, chosen on IXI
        # training pairs (self-warped: end-point error 0.471 -> 0.412 mm; inter-subject Dice
        # -0.004, within the rule's 0.005); the accurate preset lost 0.017 Dice with it
        smooth = (1.25 if preset == "fast" and not multimodal else 1.0) if greedy else 0.0
        dense = Stage(
            deformable, levels, loss=sim[0], loss_options=sim[1], lr=0.5 if greedy else 0.25,
            smooth_gradient=1.0, smooth_field=smooth,
            regularizer=None if greedy else "diffusion", regularizer_weight=1.0,
            foreground=not multimodal,
        )  # fmt: skip
    elif method == "bspline":
        dense = Stage(
            "bspline", levels, loss=sim[0], loss_options=sim[1], lr=0.25,
            regularizer="bending", regularizer_weight=1.0, control_spacing=4.0,
            foreground=not multimodal,
        )  # fmt: skip
    else:
        dense = Stage(
            "ffd", levels, loss=sim[0], loss_options=sim[1], lr=0.25,
            smooth_gradient=1.0, smooth_field=1.0, foreground=not multimodal,
        )  # fmt: skip
    return [*linear, dense]


def world_transforms(
    result: SolveResult,
    fixed: Image | LabelMap | Geometry,
    *,
    dtype: torch.dtype = torch.float32,
    invert: bool = False,
) -> tuple[Transform, Transform | None]:
    """World-mm forward (fixed -> moving) and inverse transforms of a :class:`SolveResult`
    whose fixed grid is ``fixed`` (an image's, or a geometry). The inverse is the model's own
    when it has one; with ``invert`` a dense field without one is inverted numerically
    (:func:`~unireg.spatial.inversion.invert_covering`: fixed-point iteration on the fixed
    grid extended as far as the map moves its faces), otherwise it is None."""
    geom = fixed if isinstance(fixed, Geometry) else fixed.geometry
    affine = AffineTransform(result.matrix)
    if result.displacement is None:
        return affine, affine.inverse()

    def field(u: torch.Tensor, grid: Geometry = geom) -> DisplacementFieldTransform:
        world = displacement_to_world(u.double(), grid, grid)[0].to(dtype).cpu()
        return DisplacementFieldTransform(world, grid)

    forward = CompositeTransform([field(result.displacement), affine])
    inverse = None
    if result.inverse_displacement is not None:
        inverse = CompositeTransform([affine.inverse(), field(result.inverse_displacement)])
    elif invert:  # on a grid reaching as far as the map takes the grid's faces
        inverted, grid = invert_covering(result.displacement, geom)
        inverse = CompositeTransform([affine.inverse(), field(inverted, grid)])
    return forward, inverse


# the LNCC deformable stage needs intensities about linearly related: below this Pearson r
# between the fixed image and the linearly registered moving image (over the fixed
# foreground) a named method keeps its linear result. Chosen on IXI training pairs (8 per
# group, syn): r of different contrasts (synth, skullstrip+synth) 0.38-0.58, of one contrast
# (none, skullstrip, bias, rescale, aniso, iso3, selfwarp, skullstrip+selfwarp) 0.66-0.99;
# the midpoint of the gap, 0.618, rounded. skullstrip+synth: 0.405 -> 0.479 mean Dice (every
# pair kept its linear result), the other groups unchanged.
CONTRAST_R = 0.62


def contrast_correlation(
    fixed: Image, moving: Image, matrix: np.ndarray, inside: torch.Tensor | None = None
) -> float:
    """Pearson correlation of the fixed image's intensities with the moving image's, mapped
    onto the fixed grid by the world ``matrix`` (fixed -> moving, mm), over ``inside``
    (fixed-grid booleans ``(1, 1, *shape)``; default the fixed image's
    :func:`foreground_mask`; first channels): near 1 for one contrast, far below for two."""
    warped = resample(moving, fixed.geometry, AffineTransform(matrix))
    inside = (foreground_mask(fixed) if inside is None else inside.cpu())[0, 0]
    pair = torch.stack([fixed.data[0][inside].double(), warped.data[0][inside].double()])
    r = float(torch.corrcoef(pair)[0, 1])
    return r if math.isfinite(r) else 0.0


# the linear result is replaced by the identity when its mutual information with the fixed image
# is below the identity's by more than this fraction. Chosen on the first 6 IXI training pairs:
# the linear result over the identity was 0.44-0.79 on the failed registrations of a synthetic
# brain-only moving contrast against a skull-on head, and 0.98-4.0 on the good ones of the same
# contrast with both images brain-extracted (a 1 % margin would have discarded one of those)
IDENTITY_MARGIN = 0.10


def _judge_linear_result(
    out: SolveResult, fixed: Image, moving: Image, progress: Callable[[str], None] | None
) -> bool:
    """Keep the identity world map (the images where their headers put them) when the linear
    stages' result aligns the images worse than it by the quality check's measure (mutual
    information over the fixed foreground) by more than :data:`IDENTITY_MARGIN`, as when the
    moment candidates of a brain-extracted image against a head all start far off. Noted in
    the last linear trace entry (``mi_identity``, ``mi_linear``, ``kept_identity``) and the
    progress lines; returns whether the identity was kept."""
    from unireg.quality import similarity_scores

    scores = similarity_scores(fixed, moving, {"identity": None,
                                               "linear": AffineTransform(out.matrix)})  # fmt: skip
    entry = out.trace[-1]
    entry.update(mi_identity=scores["identity"], mi_linear=scores["linear"])
    if scores["linear"] >= scores["identity"] * (1.0 - IDENTITY_MARGIN):
        return False
    entry["kept_identity"] = True
    out.matrix = np.eye(out.matrix.shape[0])
    if progress is not None:
        progress(f"the linear stages align the images worse than their headers do (mutual "
                 f"information {scores['linear']:.4f} < {scores['identity']:.4f}): kept the "
                 "identity")  # fmt: skip
    return True


def _judge_dense_stage(
    out: SolveResult,
    fixed: Image,
    moving: Image,
    forward: Transform,
    progress: Callable[[str], None] | None,
) -> bool:
    """Keep the dense stage's start (no deformation) when its result aligns the images worse
    than the linear stage alone by the quality check's measure (mutual information over the
    fixed foreground, :data:`unireg.quality.MARGIN`): its own objective (LNCC) can improve
    while the alignment gets worse, as between different contrasts. Noted in the stage's last
    trace entry (``mi_linear``, ``mi_result``, ``kept_start``) and the progress lines.
    ``forward`` is ``out``'s world transform; returns whether the start was kept.

    Chosen on IXI training pairs (8 per group; `syn`): on brain-extracted pairs of a synthetic
    moving contrast 1 in 8 was kept, 0.389 -> 0.405 mean Dice; skull-on, brain-extracted,
    bias-field and self-warped pairs never, unchanged."""
    from unireg.quality import MARGIN, similarity_scores

    assert out.displacement is not None
    scores = similarity_scores(fixed, moving, {"linear": AffineTransform(out.matrix),
                                               "result": forward})  # fmt: skip
    entry = out.trace[-1]
    entry.update(mi_linear=scores["linear"], mi_result=scores["result"])
    if scores["result"] >= scores["linear"] * (1.0 - MARGIN):
        return False
    entry["kept_start"] = True
    out.displacement = torch.zeros_like(out.displacement)
    if out.inverse_displacement is not None:
        out.inverse_displacement = torch.zeros_like(out.inverse_displacement)
    out.levels = [(f, torch.zeros_like(u)) for f, u in out.levels]
    if progress is not None:
        progress(f"{entry['model']:>10} aligns the images worse than the linear stage (mutual "
                 f"information {scores['result']:.4f} < {scores['linear']:.4f}): kept its "
                 "start")  # fmt: skip
    return True


def _prepare(image: Image, device: torch.device) -> torch.Tensor:
    return normalize_intensity(image).data.unsqueeze(0).to(device)


def register(
    fixed: Image,
    moving: Image,
    method: str = "syn",
    *,
    preset: str = "fast",
    stages: Sequence[Stage] | None = None,
    multimodal: bool = False,
    init: str = "moments",
    deformable: str = "greedy",
    iterations: Sequence[int] | None = None,
    fixed_labels: LabelMap | None = None,
    moving_labels: LabelMap | None = None,
    label_weight: float = 0.0,
    fixed_landmarks: np.ndarray | None = None,
    moving_landmarks: np.ndarray | None = None,
    landmark_weight: float = 1.0,
    mask: Image | None = None,
    foreground: int = FOREGROUND_ERODE,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` with a training-free solver (world space throughout).

    Intensities are rescaled to [0, 1] (robust percentiles) first. ``stages`` overrides the
    named ``method``/``preset``; ``iterations`` the deformable stage's levels (see
    :func:`preset_stages`). With both label maps and ``label_weight`` > 0 they are used as
    a Dice prompt; with landmarks (world mm, ``(N, d)``) a distance prompt is added. ``mask``
    (fixed grid) restricts the similarity. Without a mask, the LNCC linear stage compares the
    images over the fixed image's foreground (:func:`foreground_mask` eroded by ``foreground``
    voxels; -1: everywhere) and the MI stages over the whole grid. A named method without
    prompts or mask runs its LNCC deformable stage only when the linearly registered images
    look like one contrast (:func:`contrast_correlation` at least :data:`CONTRAST_R`; else
    the linear result is returned), a linear result that aligns the images worse than their
    headers do is replaced by the identity (:func:`_judge_linear_result`), and a deformable
    stage that aligns the images worse than the linear stage alone keeps its start
    (:func:`_judge_dense_stage`); each is noted in the trace. The result's ``transform``
    maps fixed world mm to moving world mm; ``inverse`` is given for linear methods and the
    symmetric SVF.
    """
    if fixed.ndim != moving.ndim:
        raise DimensionalityError(
            f"is {moving.ndim}D but the fixed image is {fixed.ndim}D", moving.path
        )
    if fixed.data.shape[0] != moving.data.shape[0]:
        raise ValueError("fixed and moving images need the same number of channels")
    dev = torch.device(device)
    if method == "affine-gn" and stages is None:
        landmarks = fixed_landmarks is not None or moving_landmarks is not None
        if multimodal or label_weight > 0 or landmarks or mask is not None:
            raise ValueError("affine-gn is same-modality and takes no prompts or mask")
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {PRESETS}")

        def run_gn() -> tuple[Transform, Transform | None, SolverExtras]:
            affine, trace = affine_gauss_newton(fixed, moving, levels=GN_LEVELS[preset], device=dev)
            extras = SolverExtras("affine-gn", affine.matrix.numpy(), trace=trace)
            return affine, affine.inverse(), extras

        return measured_result(fixed, moving, run_gn, dev)
    name = method if stages is None else "custom stages"
    named = stages is None
    if stages is None:
        stages = preset_stages(
            method, preset, shape=fixed.shape, multimodal=multimodal, init=init,
            deformable=deformable, iterations=iterations, spacing=fixed.spacing,
        )  # fmt: skip
    prompts: list[LabelPrompt | LandmarkPrompt] = []
    if label_weight > 0:
        if fixed_labels is None or moving_labels is None:
            raise ValueError("a label prompt needs both fixed_labels and moving_labels")
        check_same_grid(fixed, fixed_labels)
        check_same_grid(moving, moving_labels)
        prompts.append(
            LabelPrompt(fixed_labels.batch().to(dev), moving_labels.batch().to(dev), label_weight)
        )
    if fixed_landmarks is not None or moving_landmarks is not None:
        if fixed_landmarks is None or moving_landmarks is None:
            raise ValueError("give both fixed_landmarks and moving_landmarks")
        prompts.append(LandmarkPrompt(fixed_landmarks, moving_landmarks, landmark_weight))
    mask_t = None
    if mask is not None:
        check_same_grid(fixed, mask)
        mask_t = (mask.data[:1] > 0).unsqueeze(0).to(dev)
    fg = None
    if mask is None and foreground >= 0:
        fg = foreground_mask(fixed, erode=foreground).to(dev)

    # a named method's LNCC deformation only runs between images of one contrast
    judged = named and not prompts and mask_t is None
    check_contrast = judged and stages[-1].model in DENSE and stages[-1].loss != "mi"

    def run() -> tuple[Transform, Transform | None, SolverExtras]:
        f, m = _prepare(fixed, dev), _prepare(moving, dev)

        def solve_stages(chosen: Sequence[Stage], init: np.ndarray | None = None) -> SolveResult:
            return solve(
                f, m, chosen, fixed_geometry=fixed.geometry, moving_geometry=moving.geometry,
                init=init, prompts=prompts, mask=mask_t, foreground_mask=fg, seed=seed,
                progress=progress,
            )  # fmt: skip

        if not judged:
            out = solve_stages(stages)
        else:
            split = len(stages) - 1 if stages[-1].model in DENSE else len(stages)
            out = solve_stages(stages[:split])
            _judge_linear_result(out, fixed, moving, progress)
            if split < len(stages):
                r = contrast_correlation(fixed, moving, out.matrix, fg) if check_contrast else None
                if r is None or r >= CONTRAST_R:
                    dense = solve_stages(stages[split:], init=out.matrix)
                    dense.trace = out.trace + dense.trace
                    if r is not None:
                        dense.trace[-1].update(contrast_r=r)
                    out = dense
                else:
                    out.trace.append({"model": stages[-1].model, "contrast_r": r,
                                      "iterations": 0, "kept_start": True})  # fmt: skip
                    if progress is not None:
                        progress(f"{stages[-1].model:>10} skipped: the images do not look "
                                 f"like one contrast (intensity correlation {r:.2f} < "
                                 f"{CONTRAST_R}); kept the linear result (--multimodal: two "
                                 "contrasts)")  # fmt: skip
        transform, inverse = world_transforms(out, fixed)
        if out.displacement is not None and judged:
            if _judge_dense_stage(out, fixed, moving, transform, progress):
                transform, inverse = world_transforms(out, fixed)
        extras = SolverExtras(
            name, out.matrix, stages=[replace(s, levels=list(s.levels)) for s in stages],
            trace=out.trace,
        )  # fmt: skip
        return transform, inverse, extras

    return measured_result(fixed, moving, run, dev)
