"""Training-free registration: multi-scale iterative solvers over features.

:func:`solve` is the tensor-level engine (any channels, several scales, swappable transform
model, loss, regulariser, optimiser and prompts); :func:`register` registers two images with a
named method and preset and returns a :class:`~unireg.result.RegistrationResult`.
"""

from unireg.solvers.api import METHODS, PRESETS, preset_stages, register, world_transforms
from unireg.solvers.dense import (
    BSplineModel,
    DenseModel,
    FreeFormModel,
    GreedyModel,
    SVFModel,
    dense_model,
)
from unireg.solvers.linear import LinearModel, moments, moments_candidates, rotation_grid
from unireg.solvers.pyramid import downsample, level_shape, pyramid
from unireg.solvers.solver import (
    LabelPrompt,
    LandmarkPrompt,
    Level,
    SolveResult,
    Stage,
    solve,
)

__all__ = [
    "METHODS",
    "PRESETS",
    "BSplineModel",
    "DenseModel",
    "FreeFormModel",
    "GreedyModel",
    "LabelPrompt",
    "LandmarkPrompt",
    "Level",
    "LinearModel",
    "SVFModel",
    "SolveResult",
    "Stage",
    "dense_model",
    "downsample",
    "level_shape",
    "moments",
    "moments_candidates",
    "preset_stages",
    "pyramid",
    "register",
    "rotation_grid",
    "solve",
    "world_transforms",
]
