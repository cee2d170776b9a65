"""Training SITReg from a config file (TOML), with checkpoints and resume.

Each step takes two different subjects of one dataset (each under a small random affine, the
images synthesised from the label maps with ``synthesis_probability``), runs the network once
for both directions and minimises, in both directions, ``1 - LNCC^2`` (window
``lncc_window``) plus ``diffusion_weight`` times the diffusion regulariser of the voxel-unit
displacement; with ``dice_weight`` > 0 the soft Dice of the warped label maps is added (labels
only in the loss). Volumes are preprocessed onto a common grid (``spacing_mm``, ``shape``)
centred on each head's centre of mass, so pairs start roughly aligned; raw pairs go through an
affine stage first at inference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from unireg.losses import diffusion, lncc, soft_dice
from unireg.methods.sitreg import INFERENCE
from unireg.methods.sitreg.model import SITReg
from unireg.spatial.grid import voxel_to_normalized_scale
from unireg.spatial.warp import warp
from unireg.training.base import TrainConfig, Trainer


@dataclass
class SITRegConfig(TrainConfig):
    """A SITReg training run: :class:`TrainConfig` plus the network and the loss weights."""

    output: str = "runs/sitreg"
    channels: list[int] = field(default_factory=lambda: [8, 16, 32, 32])
    hidden: int = 16
    tol: float = 1e-3
    stem_stride: int = 1  # 2: the finest features (and the last update) at half resolution
    inference: str = "standard"  # the SITReg inference variant the loss sees
    lncc_window: int = 7
    diffusion_weight: float = 1.0
    dice_weight: float = 0.0
    rotation: float = 5.0
    translation: float = 4.0
    scale: list[float] = field(default_factory=lambda: [0.97, 1.03])
    shear: float = 0.0

    def check(self) -> None:
        if self.inference not in INFERENCE:
            raise ValueError(f"inference must be one of {INFERENCE}, got {self.inference!r}")
        if self.stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {self.stem_stride}")
        if self.lncc_window < 1 or self.lncc_window % 2 == 0:
            raise ValueError(f"lncc_window must be odd and positive, got {self.lncc_window}")

    def model(self) -> SITReg:
        return SITReg(3, 1, self.channels, self.hidden, self.tol, self.stem_stride)


class SITRegTrainer(Trainer):
    """LNCC + diffusion in both directions (+ optional Dice), one network pass per step."""

    method = "sitreg"
    cfg: SITRegConfig

    def loss(self, g: torch.Generator) -> torch.Tensor:
        cfg = self.cfg
        a, b = self._pair_views(g)
        self._crop_pair(a, b, g)
        fwd, inv = self.model(a["image"], b["image"], inference=cfg.inference)  # b -> a
        a_on_b = warp(a["image"], fwd, padding="border")
        b_on_a = warp(b["image"], inv, padding="border")
        total = lncc(a_on_b, b["image"], cfg.lncc_window) + lncc(
            b_on_a, a["image"], cfg.lncc_window
        )
        vox = 1.0 / voxel_to_normalized_scale(fwd.shape[2:], fwd)
        reg = diffusion(fwd * vox) + diffusion(inv * vox)
        total = total + cfg.diffusion_weight * reg
        if cfg.dice_weight > 0:
            hots = self._label_one_hots(a["labels"], b["labels"], g)
            if hots is not None:
                la, lb = hots
                dice = soft_dice(warp(la, fwd), lb) + soft_dice(warp(lb, inv), la)
                total = total + cfg.dice_weight * dice
        return total
