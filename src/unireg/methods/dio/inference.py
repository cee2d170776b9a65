"""DIO on raw images: a linear stage on the intensities, each image's features on its own
grid, and the solver registering the features with the transform model, iterations and
prompts chosen at test time."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from unireg.io.image import Image, LabelMap, resample
from unireg.methods.base import MethodEntry, Prompts, parse_iterations
from unireg.methods.dio import (
    DEFAULT_ITERATIONS,
    TRANSFORMS,
    DIOOptions,
)
from unireg.methods.dio.model import FACTORS, FeatureNet, Trunk
from unireg.methods.dio.training import DIOConfig
from unireg.methods.pipeline import (
    channels_last_pays,
    check_dimensions,
    in_dtype,
    matched_pair,
    network_dtype,
    network_input,
)
from unireg.methods.stages import affine_stage
from unireg.result import DIOExtras, RegistrationResult, measured_result
from unireg.solvers.api import world_transforms
from unireg.solvers.pyramid import level_geometry, principal_axes, principal_channels
from unireg.solvers.solver import LabelPrompt, LandmarkPrompt, Level, solve
from unireg.spatial.geometry import Geometry
from unireg.spatial.transform import Transform
from unireg.training.checkpoint import Checkpoint


def feature_grid(image: Image, spacing: float) -> Geometry:
    """The grid the network sees ``image`` on: its own axes, centre and field of view at the
    network's training ``spacing`` (mm, isotropic; :meth:`Geometry.regrid`); the image's own
    grid when its spacing is that already (within 1 %)."""
    geom = image.geometry
    if all(abs(s - spacing) <= 0.01 * spacing for s in geom.spacing):
        return geom
    return geom.regrid((spacing,) * geom.ndim)


def _labels_on(labels: LabelMap, grid: Geometry) -> torch.Tensor:
    """A label map of ``image``'s grid as ``(1, 1, *grid.shape)`` on the feature grid."""
    if labels.geometry.same_grid(grid):
        return labels.batch()
    return resample(labels, grid).batch()


def _trunk(
    net: FeatureNet, image: torch.Tensor, factors: Sequence[float], dtype: torch.dtype
) -> Trunk:
    """``net.trunk`` with its convolutions in ``dtype`` (autocast), levels back in float32."""
    with in_dtype(dtype, image.device):
        out = net.trunk(image, factors)
    return Trunk({f: v.float() for f, v in out.levels.items()}, out.shape, out.padded)


def pair_features(
    net: FeatureNet,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    factors: Sequence[float],
    tolerance: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[float, torch.Tensor], dict[float, torch.Tensor]]:
    """Both images' features ``{factor: (B, k, *level shape)}`` for the solver. With
    ``tolerance`` > 0 each level is projected onto its principal axes
    (:func:`~unireg.solvers.pyramid.principal_channels`); at full resolution the axes are
    estimated on every second voxel along each axis and the head computes the ``k``
    projected channels directly (the head is linear: the same features as projecting all
    ``F`` channels with those axes, at ``k / F`` of the head's cost). ``dtype``: the trunk's
    number format (:func:`~unireg.methods.pipeline.network_dtype`); heads and projections
    run in float32."""
    tf, tm = _trunk(net, fixed, factors, dtype), _trunk(net, moving, factors, dtype)
    ff: dict[float, torch.Tensor] = {}
    fm: dict[float, torch.Tensor] = {}
    for f in sorted(tf.levels, reverse=True):
        if tolerance > 0 and f == 1:
            basis = principal_axes(net.head(tf, f, every=2), net.head(tm, f, every=2), tolerance)
            ff[f], fm[f] = net.head(tf, f, basis), net.head(tm, f, basis)
        else:
            ff[f], fm[f] = principal_channels(net.head(tf, f), net.head(tm, f), tolerance)
    return ff, fm


def register_dio(
    fixed: Image,
    moving: Image,
    *,
    model: FeatureNet,
    checkpoint: Checkpoint,
    transform: str = "ffd",
    iterations: Sequence[int] | None = None,
    affine: str = "affine-gn",
    preset: str = "fast",
    tolerance: float = 0.0,
    match_resolution: bool = False,
    precision: str = "float32",
    prompts: Prompts | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Callable[[str], None] | None = None,
    brain: str = "auto",
) -> RegistrationResult:
    """Register raw ``moving`` onto ``fixed`` with a trained feature network.

    With ``match_resolution`` each image is first blurred along its axes to the other's
    resolution where the other's is coarser (:func:`~unireg.methods.pipeline.matched_pair`: a
    thin-slice image against a thick-slice one), for the affine stage and the network; the
    result still warps the moving image as given.

    1. ``affine`` stage on the intensities (see :func:`unireg.methods.stages.affine_stage`,
       which ``brain`` is passed to): ``A``, fixed world -> moving world (mm).
    2. Each image on its own feature grid (:func:`feature_grid`: its field of view at the
       training spacing), intensities to [0, 1], through the network: features at 1/4, 1/2
       and 1 of that grid (only down to the finest level with iterations: with none at full
       resolution the solve's finest grid is the 1/2 level, and the field is held there).
    3. The solver fits ``transform`` to the features: ``iterations`` caps per level
       (default :data:`~unireg.methods.dio.DEFAULT_ITERATIONS`), feature MSE with the step
       and smoothing the model was trained with, coarse to fine, each level stopping early,
       starting from ``A``; ``prompts`` add a soft-Dice term of the label maps
       (``label_weight``), a landmark distance term (world mm) and a similarity mask. With
       ``tolerance`` > 0 each level's features are first projected onto the fewest principal
       axes that keep all but that share of their variance (:func:`pair_features`).

    The result maps fixed world mm to moving world mm: ``x -> A'(x + u(x))`` for the dense
    models (``A' = A``), ``A'`` alone for ``affine``. Its inverse is the model's own for
    ``svf`` and ``affine``, the field inverted by fixed-point iteration for ``diffeo``, and
    None for ``ffd`` and ``bspline`` (their fields may fold).
    """
    check_dimensions(fixed, moving, int(model.config["ndim"]))
    dev = torch.device(device)
    p = prompts or Prompts()
    spacing = float(checkpoint.preprocessing.get("spacing_mm", 2.0))
    if iterations is None:
        iterations = parse_iterations(DEFAULT_ITERATIONS)
    config = DIOConfig.of_checkpoint(checkpoint.train_config)
    stage = config.stage(TRANSFORMS[transform], iterations)
    # levels without iterations finer than the last that has some are not computed
    finest = min(lv.factor for lv in stage.levels)
    factors = [f for f in FACTORS if f >= finest]
    stage.levels = [Level(lv.factor / finest, lv.iterations, lv.lr) for lv in stage.levels]

    def run() -> tuple[Transform, Transform | None, DIOExtras]:
        t0 = time.perf_counter()
        seen = matched_pair(fixed, moving) if match_resolution else (fixed, moving)
        linear = affine_stage(seen[0], seen[1], affine, preset, dev, brain=brain)
        t1 = time.perf_counter()
        grids = (feature_grid(fixed, spacing), feature_grid(moving, spacing))
        net = (model if model.is_merged else model.merged()).to(dev)
        with torch.no_grad():
            ff, fm = pair_features(
                net, network_input(seen[0], grids[0]).to(dev),
                network_input(seen[1], grids[1]).to(dev), factors, tolerance,
                network_dtype(precision, dev),
            )  # fmt: skip
        # the solve's finest grid is the finest level asked for: its features and geometry,
        # the factors counted from it
        grids = (
            level_geometry(grids[0], tuple(ff[finest].shape[2:])),
            level_geometry(grids[1], tuple(fm[finest].shape[2:])),
        )
        channels = {f: int(x.shape[1]) for f, x in ff.items()}
        ff = {f / finest: x for f, x in ff.items()}
        fm = {f / finest: x for f, x in fm.items()}
        t2 = time.perf_counter()
        terms: list[LabelPrompt | LandmarkPrompt] = []
        if p.label_weight > 0 and p.fixed_labels is not None and p.moving_labels is not None:
            terms.append(LabelPrompt(
                _labels_on(p.fixed_labels, grids[0]).to(dev),
                _labels_on(p.moving_labels, grids[1]).to(dev), p.label_weight,
            ))  # fmt: skip
        if p.fixed_landmarks is not None and p.moving_landmarks is not None:
            terms.append(LandmarkPrompt(p.fixed_landmarks, p.moving_landmarks, p.landmark_weight))
        mask = None
        if p.mask is not None:
            on_grid = resample(p.mask.with_data(p.mask.data[:1].float()), grids[0])
            mask = (on_grid.data > 0.5).unsqueeze(0).to(dev)
        out = solve(
            ff, fm, [stage], fixed_geometry=grids[0], moving_geometry=grids[1],
            init=linear.matrix.numpy(), prompts=terms, mask=mask, seed=seed, progress=progress,
        )  # fmt: skip
        # a greedy map is a diffeomorphism, inverted by fixed-point iteration; free-form and
        # B-spline fields may fold, and have no inverse to write
        forward, inverse = world_transforms(out, grids[0], invert=stage.model == "greedy")
        t3 = time.perf_counter()
        extras = DIOExtras(
            method=f"dio ({transform}, affine stage {affine})", matrix=np.asarray(out.matrix),
            transform_kind=transform, iterations=tuple(int(n) for n in iterations),
            feature_grids=grids, trace=out.trace, channels=channels,
            stage_seconds={"affine": t1 - t0, "network": t2 - t1, "solver": t3 - t2},
        )  # fmt: skip
        return forward, inverse, extras

    return measured_result(fixed, moving, run, dev)


class DIOMethod:
    """DIO behind the :class:`~unireg.methods.base.Method` protocol: the feature network
    loaded once, each pair registered with the options' transform model and iterations."""

    def __init__(self, entry: MethodEntry, options: DIOOptions, device: str = "cpu"):
        from unireg.methods.registry import load_model

        self.entry, self.options, self.device = entry, options, torch.device(device)
        model, self.checkpoint = load_model(entry.name, options.model, device=self.device)
        assert isinstance(model, FeatureNet)
        self.model = model.merged()
        dtype = network_dtype(options.precision, self.device)
        if channels_last_pays(dtype, self.device):
            # float32: the 1/4 level's block stays in the default layout (FeatureNet's
            # channels_last says why; bfloat16 was not measured so)
            self.model.channels_last(coarsest=dtype != torch.float32)

    def register(
        self,
        fixed: Image,
        moving: Image,
        *,
        prompts: Prompts | None = None,
        seed: int = 0,
        progress: Callable[[str], None] | None = None,
    ) -> RegistrationResult:
        o = self.options
        return register_dio(
            fixed, moving, model=self.model, checkpoint=self.checkpoint,
            transform=o.transform, iterations=parse_iterations(o.iterations), affine=o.affine,
            preset=o.preset, tolerance=o.feature_tolerance,
            match_resolution=o.resolution == "match", precision=o.precision, prompts=prompts,
            seed=seed, device=self.device, progress=progress, brain=o.brain,
        )  # fmt: skip
