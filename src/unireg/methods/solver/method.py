"""The solvers behind the :class:`~unireg.methods.base.Method` protocol."""

from __future__ import annotations

from collections.abc import Callable

import torch

from unireg.io.image import Image
from unireg.methods.base import MethodEntry, OptionError, Prompts, parse_iterations
from unireg.methods.solver import SolverOptions
from unireg.result import RegistrationResult
from unireg.solvers import register


class SolverMethod:
    """One named solver method (``entry.name``) with its options."""

    def __init__(self, entry: MethodEntry, options: SolverOptions, device: str = "cpu"):
        self.entry, self.options, self.device = entry, options, torch.device(device)

    def register(
        self,
        fixed: Image,
        moving: Image,
        *,
        prompts: Prompts | None = None,
        seed: int = 0,
        progress: Callable[[str], None] | None = None,
    ) -> RegistrationResult:
        p = prompts or Prompts()
        if self.entry.name == "affine-gn" and p.uses():
            raise OptionError(f"affine-gn takes no {', '.join(p.uses())}")
        o = self.options
        iterations = None if o.iterations is None else parse_iterations(o.iterations)
        return register(
            fixed, moving, self.entry.name, preset=o.preset, multimodal=o.multimodal,
            init=o.init, deformable=o.deformable, iterations=iterations,
            fixed_labels=p.fixed_labels,
            moving_labels=p.moving_labels, label_weight=p.label_weight,
            fixed_landmarks=p.fixed_landmarks, moving_landmarks=p.moving_landmarks,
            landmark_weight=p.landmark_weight, mask=p.mask, device=self.device, seed=seed,
            progress=progress,
        )  # fmt: skip
