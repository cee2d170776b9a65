"""Training DIO's feature network from a config file (TOML), with checkpoints and resume.

Each step takes two different subjects of one dataset (each under a small random affine, the
images synthesised from their label maps with ``synthesis_probability``), computes both
images' features with the shared network, and registers them with the solver as a layer
(:func:`unireg.solvers.layer.register_features`: free-form displacement, feature MSE, no
graph through the iterations). The loss, averaged over the pyramid levels the solver has run,
is ``1 - LNCC^2`` (window ``lncc_window``) of the moving image warped by that level's optimum
plus ``dice_weight`` times ``1 - soft Dice`` of the warped one-hot label maps. Its gradient
reaches the features through one Jacobian-free solver step at each level's optimum.

The level curriculum (``curriculum``: the step at which each of the 1/4, 1/2 and full levels
joins) trains the coarse features first: early steps solve at 1/4 only, and cost little.
Labels in ``holdout_labels`` never enter the Dice term (structures kept to test label prompts
on).

Not in the paper: with ``invariance_weight`` > 0 the fixed view is also drawn a second time
(another image of the same subject, real or synthesised, on the same grid under the same view
affine, with its own bias and noise), and :func:`invariance_loss` between the two views'
features inside the brain, averaged over the levels, is added: the network is asked for
the same features whatever the contrast, brain extraction and resolution of the scan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from unireg.data.augment import apply_affine
from unireg.losses import lncc, soft_dice
from unireg.methods.dio.model import BACKBONES, FACTORS, FeatureNet
from unireg.solvers.layer import register_features
from unireg.solvers.pyramid import downsample
from unireg.solvers.solver import Level, Stage
from unireg.spatial.field import resize_displacement
from unireg.spatial.warp import warp
from unireg.training.base import TrainConfig, Trainer

# the linear solver's step when the features are registered affinely (fraction of the
# half-diagonal / radians per step: the syn preset's affine refinement)
AFFINE_LR = 0.005


@dataclass
class DIOConfig(TrainConfig):
    """A DIO training run: :class:`TrainConfig` plus the network, the solver and the loss."""

    output: str = "runs/dio"
    backbone: str = "lku"
    channels: list[int] = field(default_factory=lambda: [8, 16, 32])
    features: int = 16
    # the solver inside the loss: iteration caps at 1/4, 1/2, 1; Adam step (voxels); the
    # Gaussian smoothing of gradient and field (voxels); early stop (relative, over `window`)
    iterations: list[int] = field(default_factory=lambda: [60, 30, 10])
    solver_lr: float = 0.25
    smooth_gradient: float = 1.0
    smooth_field: float = 0.5
    tolerance: float = 1e-3
    window: int = 4
    implicit_step: float = 1.0  # eta of the Jacobian-free step (voxels per unit gradient)
    curriculum: list[int] = field(default_factory=lambda: [0, 200, 500])
    lncc_window: int = 7
    dice_weight: float = 1.0
    holdout_labels: list[int] = field(default_factory=list)  # never in the Dice loss
    invariance_weight: float = 0.0  # feature invariance across two contrasts of one view
    rotation: float = 5.0
    translation: float = 4.0
    scale: list[float] = field(default_factory=lambda: [0.97, 1.03])
    shear: float = 0.0

    def check(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if len(self.iterations) != 3 or min(self.iterations) < 1:
            raise ValueError(f"iterations must be 3 counts >= 1, got {self.iterations}")
        if (
            len(self.curriculum) != 3
            or self.curriculum[0] != 0
            or sorted(self.curriculum) != list(self.curriculum)
        ):
            raise ValueError(f"curriculum must be 3 rising steps from 0, got {self.curriculum}")
        if self.lncc_window < 1 or self.lncc_window % 2 == 0:
            raise ValueError(f"lncc_window must be odd and positive, got {self.lncc_window}")
        if self.invariance_weight < 0:
            raise ValueError(f"invariance_weight must be >= 0, got {self.invariance_weight}")
        if self.invariance_weight > 0 and self.same_subject_probability > 0:
            raise ValueError("invariance_weight works on pairs of two subjects: set "
                             "same_subject_probability = 0")  # fmt: skip

    def model(self) -> FeatureNet:
        return FeatureNet(3, self.channels, self.features, self.backbone)

    @classmethod
    def of_checkpoint(cls, train_config: Mapping[str, Any]) -> DIOConfig:
        """The config a checkpoint was trained with (its ``train_config``; settings it lacks
        take their defaults)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in train_config.items() if k in known})

    def stage(
        self, model: str = "ffd", iterations: Sequence[int] | None = None, levels: int = 3
    ) -> Stage:
        """The solver stage on the features: ``model`` (a dense model of the solver, or
        ``affine``) over the first ``levels`` of the 1/4, 1/2 and 1 levels, at most
        ``iterations`` each (default the training caps; a level of 0 is skipped), feature
        MSE, the trained step, smoothing and early stop."""
        caps = self.iterations if iterations is None else iterations
        schedule = [Level(f, int(n)) for f, n in zip(FACTORS, caps, strict=True)][:levels]
        schedule = [lv for lv in schedule if lv.iterations > 0]
        if model == "affine":
            return Stage("affine", schedule, loss="mse", lr=AFFINE_LR, tolerance=self.tolerance,
                         window=self.window)  # fmt: skip
        return Stage(
            model, schedule, loss="mse", lr=self.solver_lr,
            smooth_gradient=self.smooth_gradient, smooth_field=self.smooth_field,
            tolerance=self.tolerance, window=self.window,
        )  # fmt: skip


def level_loss(
    displacement: torch.Tensor,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    hots: tuple[torch.Tensor, torch.Tensor] | None,
    window: int,
    dice_weight: float,
) -> torch.Tensor:
    """``1 - LNCC^2`` of ``moving`` warped by a level's normalised ``displacement``
    (upsampled to the images' grid) against ``fixed``, plus ``dice_weight`` times
    ``1 - soft Dice`` of the warped moving one-hot maps (``hots = (moving, fixed)``)."""
    u = displacement
    if tuple(u.shape[2:]) != tuple(fixed.shape[2:]):
        u = resize_displacement(u, tuple(fixed.shape[2:]), units="normalized")
    total = lncc(warp(moving, u, padding="border"), fixed, window)
    if hots is not None and dice_weight > 0:
        total = total + dice_weight * soft_dice(warp(hots[0], u), hots[1])
    return total


def invariance_loss(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """How far two feature maps ``x``, ``y`` ``(B, C, *s)`` of one view differ inside
    ``mask`` ``(B, 1, *s)``: ``sum m |x - y|^2 / sum m (|x - x_m|^2 + |y - y_m|^2)`` with
    ``x_m``, ``y_m`` the maps' channel means inside the mask. 0 when they are equal, about 1
    when they are unrelated with equal spread, 2 when ``y = -x`` about a common mean; unchanged
    when both are scaled by one factor (so shrinking the features does not lower it)."""
    m = mask.to(x.dtype)
    count = m.sum(dim=tuple(range(2, m.ndim)), keepdim=True).clamp_min(1.0)
    dims = tuple(range(2, x.ndim))
    xm = (x * m).sum(dims, keepdim=True) / count
    ym = (y * m).sum(dims, keepdim=True) / count
    diff = (m * (x - y) ** 2).sum()
    spread = (m * ((x - xm) ** 2 + (y - ym) ** 2)).sum()
    return diff / spread.clamp_min(1e-12)


def level_invariance(
    fa: Mapping[float, torch.Tensor], fb: Mapping[float, torch.Tensor], labels: torch.Tensor
) -> torch.Tensor:
    """:func:`invariance_loss` between two views' features ``{factor: (B, C, *level)}``
    inside the foreground of the views' ``labels`` ``(B, 1, *shape)`` (on each level's grid
    as the solver puts masks there), averaged over the levels."""
    fg = (labels > 0).float()
    terms = [
        invariance_loss(fa[f], fb[f], downsample(fg, f, smooth=False, shape=fa[f].shape[2:]) > 0.5)
        for f in fa
    ]
    return torch.stack(terms).mean()


class DIOTrainer(Trainer):
    """Image similarity and soft Dice at every level of the solver's optimum."""

    method = "dio"
    cfg: DIOConfig

    def active_levels(self) -> int:
        """How many pyramid levels (coarse first) the curriculum has opened at this step."""
        return sum(self.step >= s for s in self.cfg.curriculum)

    def phase(self) -> str:
        return f"levels={self.active_levels()}"

    def loss(self, g: torch.Generator) -> torch.Tensor:
        cfg = self.cfg
        if cfg.invariance_weight > 0:  # and a second image of the fixed view
            ia, ib = self._pair_items(g)
            a, b = self._view(ia, g), self._view(ib, g)
            more = [self._second_contrast(ib, b, g)]
        else:
            a, b = self._pair_views(g)
            more = []
        self._crop_pair(a, b, g, *more)  # a moving, b fixed
        feats = self.model(torch.cat([v["image"] for v in (a, b, *more)]))
        moving = {f: x[:1] for f, x in feats.items()}
        fixed = {f: x[1:2] for f, x in feats.items()}
        out = register_features(
            fixed, moving, [cfg.stage(levels=self.active_levels())], step=cfg.implicit_step,
            seed=self.step,
        )  # fmt: skip
        la, lb = a["labels"], b["labels"]
        if cfg.holdout_labels:  # structures the network never sees a Dice term for
            held = torch.tensor(cfg.holdout_labels, device=la.device)
            la = torch.where(torch.isin(la, held), torch.zeros_like(la), la)
            lb = torch.where(torch.isin(lb, held), torch.zeros_like(lb), lb)
        hots = self._label_one_hots(la, lb, g)
        losses = [
            level_loss(u, a["image"], b["image"], hots, cfg.lncc_window, cfg.dice_weight)
            for u in out.levels.values()
        ]
        total = torch.stack(losses).mean()
        if cfg.invariance_weight > 0:
            second = {f: x[2:3] for f, x in feats.items()}
            total = total + cfg.invariance_weight * level_invariance(fixed, second, b["labels"])
        return total

    def _second_contrast(
        self, item: dict[str, Any], view: dict[str, Any], g: torch.Generator
    ) -> dict[str, Any]:
        """Another image of ``item`` (:meth:`_image`: real or synthesised, brain-extracted,
        coarser) under ``view``'s affine, with its own bias and noise; ``view``'s labels."""
        image, _ = apply_affine(self._image(item, g), None, view["matrix"])
        assert image is not None
        image = self.aug(image, generator=g)["image"]
        return {"image": image.to(self.device), "labels": view["labels"]}

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"levels": self.active_levels()}
