"""The training-free solvers (:mod:`unireg.solvers`) as registered methods: ``rigid``,
``affine``, ``affine-gn``, ``syn``, ``bspline`` and ``ffd``, each a named chain of solver
stages with a preset. Spec strings may prefix them with ``unireg:`` (``unireg:syn``).

This module holds their options and registry entries and imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from unireg.methods.base import (
    MethodEntry,
    MethodOptions,
    OptionError,
    lazy_exports,
    option,
    parse_iterations,
)

PRESETS = ("fast", "accurate")
# the solvers with a deformable stage (whose iterations per level may be set)
DEFORMABLE = ("syn", "bspline", "ffd")
# the linear stage learned methods run on the intensities before their network or solver
AFFINE_STAGES = ("affine", "affine-gn", "rigid", "keymorph", "none")


def preset_option() -> Any:
    """The ``preset`` option of the solvers and of the solver stages other methods run."""
    return option(
        "fast", choices=PRESETS,
        help="solvers: the preset (pyramid and iterations); sitreg, dio, avsm: that of their "
        "linear stage",
    )  # fmt: skip


def affine_stage_option() -> Any:
    """The ``affine`` option (flag ``--affine-stage``) of methods that run a linear stage
    first."""
    return option(
        "affine-gn", choices=AFFINE_STAGES, flag="--affine-stage",
        help="sitreg, dio: the linear stage run first ('affine-gn': Gauss-Newton, same "
        "modality; 'keymorph': KeyMorph's keypoints then affine-gn, for heads in any "
        "orientation; 'none' for pre-aligned pairs)",
    )  # fmt: skip


@dataclass(frozen=True)
class SolverOptions(MethodOptions):
    """A solver method's settings (see :func:`unireg.solvers.register`)."""

    method = "solver"

    preset: str = preset_option()
    multimodal: bool = option(False, help="solvers: MI for the deformable stage")
    init: str = option(
        "moments", choices=("moments", "search"),
        help="solvers: linear initialisation; 'search' also tries a grid of rotations (large "
        "rotations)",
    )  # fmt: skip
    deformable: str = option(
        "greedy", choices=("greedy", "svf"),
        help="syn's model: greedy compositive or symmetric SVF (gives the inverse)",
    )  # fmt: skip
    iterations: str | None = option(
        None,
        help="syn, bspline, ffd: the deformable stage's iteration caps at 1/4, 1/2 and full "
        "resolution (0 skips a level; each stops early when the similarity no longer "
        "improves); default: the preset's (fast 80,40,0; on grids of 1.5 mm or coarser "
        "syn 60,10,2, bspline 60,10,3, ffd 80,10,1; accurate 100,60,20)",
    )  # fmt: skip

    def check(self, where: str = "", method: str = "") -> None:
        if self.iterations is not None:
            if method not in DEFORMABLE:
                raise OptionError(f"{where}: iterations is for the deformable solvers {DEFORMABLE}")
            try:
                parse_iterations(self.iterations, "60,30,5")
            except OptionError as err:
                raise OptionError(f"{where}: {err}") from err
        if self.deformable != "greedy" and method != "syn":
            raise OptionError(f"{where}: deformable is syn's option")
        if method == "affine-gn" and (self.multimodal or self.init != "moments"):
            raise OptionError(f"{where}: affine-gn is same-modality and starts from moments")


_SUMMARIES = {
    "rigid": "rigid (moments or rotation search), MI",
    "affine": "rigid then affine, MI; LNCC refinement for one modality",
    "affine-gn": "affine by Gauss-Newton on local intensities (one modality, fastest)",
    "syn": "affine then diffeomorphic (greedy or symmetric SVF), LNCC; MI with --multimodal",
    "bspline": "affine then cubic B-spline free-form deformation, LNCC",
    "ffd": "affine then smoothed free-form displacement, LNCC",
}
METHODS = tuple(
    MethodEntry(
        name=name,
        summary=summary,
        options=SolverOptions,
        family="unireg",
        factory="unireg.methods.solver.method:SolverMethod",
        prompts=() if name == "affine-gn" else ("labels", "landmarks", "mask"),
    )  # fmt: skip
    for name, summary in _SUMMARIES.items()
)

__getattr__ = lazy_exports(__name__, {"SolverMethod": "method"})
