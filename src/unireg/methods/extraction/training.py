"""Training the brain-mask network from a config file (TOML), with checkpoints and resume.

Each step draws one subject (the datasets in turn: IXI T1 with its DLMUSE brain labels,
SynthSeg whole-head label maps), one view of it as every trainer draws them (a real T1 or an
image of random contrast synthesised from the label map, in SynthStrip's manner: the whole
head for SynthSeg maps, brain only for IXI's brain labels; brain-extracted with the configured
probabilities; random affine, resolution loss, bias field and noise), and scores the network's
brain logits against the view's brain mask (its brain labels, closed by one voxel): binary
cross-entropy plus ``1 - soft Dice``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from unireg.losses import soft_dice
from unireg.methods.extraction.model import BrainMaskNet
from unireg.training.base import TrainConfig, Trainer


@dataclass
class BrainMaskConfig(TrainConfig):
    """A brain-mask training run: :class:`TrainConfig` plus the network and the loss."""

    output: str = "runs/brainmask"
    channels: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    spacing_mm: float = 4.0
    shape: list[int] = field(default_factory=lambda: [64, 64, 64])
    dice_weight: float = 1.0
    rotation: float = 20.0
    translation: float = 20.0
    synthesis_probability: float = 0.5
    skull_strip_probability: float = 0.3
    invert_probability: float = 0.3
    synthesised_skull_strip_probability: float = 0.25
    resolution_change: float = 3.0

    def check(self) -> None:
        if len(self.channels) < 2 or min(self.channels) < 1:
            raise ValueError(f"channels must list at least 2 positive sizes, got {self.channels}")
        if self.dice_weight < 0:
            raise ValueError(f"dice_weight must be >= 0, got {self.dice_weight}")

    def model(self) -> BrainMaskNet:
        return BrainMaskNet(len(self.shape), self.channels)


def closed_mask(labels: torch.Tensor) -> torch.Tensor:
    """``labels > 0`` ``(B, 1, *shape)`` closed by one voxel (dilated, then eroded: gaps of
    one voxel between labelled structures filled), as float."""
    d = labels.ndim - 2
    pool = F.max_pool3d if d == 3 else F.max_pool2d
    mask = (labels > 0).float()
    dilated = pool(mask, kernel_size=3, stride=1, padding=1)
    return -pool(-dilated, kernel_size=3, stride=1, padding=1)


class BrainMaskTrainer(Trainer):
    """:class:`~unireg.training.base.Trainer` for :class:`BrainMaskNet`."""

    method = "brainmask"
    cfg: BrainMaskConfig

    def loss(self, g: torch.Generator) -> torch.Tensor:
        datasets = sorted(self.volumes.by_dataset)
        which = datasets[int(torch.randint(len(datasets), (1,), generator=g))]
        pool = self.volumes.by_dataset[which]
        item = self.volumes.items[pool[int(torch.randint(len(pool), (1,), generator=g))]]
        view = self._view(item, g)
        target = closed_mask(view["labels"])
        logits = self.model(view["image"])
        bce = F.binary_cross_entropy_with_logits(logits, target)
        prob = torch.sigmoid(logits)
        return bce + self.cfg.dice_weight * soft_dice(prob, target)
