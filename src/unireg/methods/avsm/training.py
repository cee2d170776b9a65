"""Training AVSM from a config file (TOML), in two phases, with checkpoints and resume.

Phase ``affine`` (the first ``affine_phase_steps`` steps): the affine network alone, on
``affine_batch`` pairs a step, one recurrent step for the first ``affine_single_steps``
steps, then ``affine_recurrent`` steps.
The moving view is rotated up to ``rotation`` degrees per axis, the fixed one up to
``fixed_rotation``. Loss, the pair run in both orders: global NCC (``1 - NCC``) for the first
``affine_ncc_steps`` steps, then the multi-kernel LNCC; plus ``affine_reg_weight`` times
``||A - I||^2 + ||b||^2`` halved every ``affine_reg_halflife`` steps, plus
``affine_sym_weight`` times ``||A_st A_ts - I||^2 + ||A_st b_ts + b_st||^2`` (parameter frame);
plus a guide that is not in the paper: ``affine_guide_weight`` times the mean squared distance
(parameter frame) at the grid's corners between the predicted affine and the affine the two
views' augmentations imply (the subjects themselves lie centred on their heads, so that is
the answer up to their anatomy), decaying linearly to zero over ``affine_guide_steps`` steps,
after which similarity alone trains the network. It shortens the search for large rotations
that the similarity alone finds slowly. With ``affine_dice_weight`` (not in the paper either),
also the soft Dice of the one-hot label maps warped by the affine, on the grid the network
sees (label maps averaged over ``affine_downsample^d`` voxels).

Phase ``vsvf`` (the remaining steps): the affine network frozen (``affine_test_steps`` steps),
the momentum network trained through ``vsvf_steps`` vSVF passes (no detach between passes,
the loss on the final map), views rotated up to ``vsvf_rotation``. Loss: multi-kernel LNCC of
the warped image, ``momentum_weight`` times ``<m, v>`` summed over passes (clamped at 0),
``dice_weight`` times the soft Dice of the warped one-hot label maps; with ``symmetric`` the
pair also runs in the other order, with ``symmetry_weight`` times
``mean |Phi_st o Phi_ts - id|^2`` (normalised units).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from unireg.losses import multi_kernel_lncc, ncc, soft_dice
from unireg.methods.avsm.model import AVSM, SIGMAS, WEIGHTS, parameter_frame
from unireg.spatial.grid import channels_first, channels_last, shared_identity_grid
from unireg.spatial.warp import sample
from unireg.training.base import TrainConfig, Trainer


@dataclass
class AVSMConfig(TrainConfig):
    """An AVSM training run: :class:`TrainConfig` plus the network, the two phases and the
    loss weights (``steps`` counts both phases)."""

    output: str = "runs/avsm"
    affine_channels: list[int] = field(default_factory=lambda: [8, 16, 16, 4])
    affine_hidden: int = 32
    affine_downsample: int = 2
    momentum_channels: list[int] = field(default_factory=lambda: [16, 32, 32, 32])
    length_mm: float = 100.0
    integration_steps: int = 10
    cfl: float = 0.5
    sigmas: list[float] = field(default_factory=lambda: list(SIGMAS))
    weights: list[float] = field(default_factory=lambda: list(WEIGHTS))
    # phase 1: the affine network
    affine_phase_steps: int = 600
    affine_batch: int = 4
    affine_single_steps: int = 200
    affine_recurrent: int = 5
    affine_ncc_steps: int = 100
    affine_reg_weight: float = 1.0
    affine_reg_halflife: int = 100
    affine_sym_weight: float = 1.0
    affine_guide_weight: float = 1.0
    affine_guide_steps: int = 600
    affine_dice_weight: float = 0.0
    fixed_rotation: float = 5.0
    # phase 2: the vSVF stage
    affine_test_steps: int = 7
    vsvf_steps: int = 2
    vsvf_rotation: float = 5.0
    momentum_weight: float = 1.0
    dice_weight: float = 0.0
    symmetric: bool = False
    symmetry_weight: float = 1.0
    lncc_windows: list[int] = field(default_factory=lambda: [7, 13, 25])
    lncc_weights: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.6])

    def check(self) -> None:
        if not 0 <= self.affine_single_steps <= self.affine_phase_steps <= self.steps:
            raise ValueError("need 0 <= affine_single_steps <= affine_phase_steps <= steps")
        if min(self.affine_recurrent, self.affine_test_steps, self.vsvf_steps) < 1:
            raise ValueError("affine_recurrent, affine_test_steps and vsvf_steps must be >= 1")
        if len(self.lncc_windows) != len(self.lncc_weights):
            raise ValueError("lncc_windows and lncc_weights must have the same length")
        if len(self.sigmas) != len(self.weights) or abs(sum(self.weights) - 1) > 1e-6:
            raise ValueError("one weight per sigma, the weights summing to 1")

    def model(self) -> AVSM:
        return AVSM(
            3, self.shape, self.affine_channels, self.affine_hidden, self.affine_downsample,
            self.momentum_channels,
            self.length_mm, self.integration_steps, self.cfl, self.sigmas, self.weights,
        )  # fmt: skip


def affine_symmetry(forward: torch.Tensor, backward: torch.Tensor) -> torch.Tensor:
    """``||A_st A_ts - I||^2 + ||A_st b_ts + b_st||^2`` of two homogeneous affines ``(B,
    d+1, d+1)`` (one per order): the squared distance of their product from the identity,
    averaged over the batch. Zero for an exactly inverse pair."""
    d = forward.shape[-1] - 1
    eye = torch.eye(d + 1, dtype=forward.dtype, device=forward.device)
    product = forward @ backward
    return ((product - eye)[:, :d, :] ** 2).sum((1, 2)).mean()


def map_symmetry(forward: torch.Tensor, backward: torch.Tensor) -> torch.Tensor:
    """``mean |Phi_st o Phi_ts - id|^2`` of two point maps ``(B, *shape, d)`` (normalised,
    each from one grid to the other, both grids of one shape): ``Phi_st`` sampled at
    ``Phi_ts(x)``. Zero for an exactly inverse pair (up to interpolation)."""
    composed = channels_last(sample(channels_first(forward), backward, padding="border"))
    grid = shared_identity_grid(tuple(forward.shape[1:-1]), device=forward.device,
                                dtype=forward.dtype)  # fmt: skip
    return ((composed - grid) ** 2).sum(-1).mean()


class AVSMTrainer(Trainer):
    """The affine network, then the vSVF stage with the affine network frozen."""

    method = "avsm"
    cfg: AVSMConfig
    model: AVSM

    def phase(self) -> str:
        cfg = self.cfg
        if self.step < cfg.affine_single_steps:
            return "affine-1"
        if self.step < cfg.affine_phase_steps:
            return f"affine-{cfg.affine_recurrent}"
        return "vsvf"

    def _frame(self, item: dict[str, Any]) -> torch.Tensor:
        geom = item["geometry"]
        linear = torch.from_numpy(geom.normalized_to_world[:3, :3]).float()
        return parameter_frame(linear, self.cfg.length_mm).to(self.device)

    def _similarity(self, warped: torch.Tensor, fixed: torch.Tensor, global_ncc: bool) -> Any:
        if global_ncc:
            return ncc(warped, fixed)
        cfg = self.cfg
        return multi_kernel_lncc(warped, fixed, cfg.lncc_windows, cfg.lncc_weights)

    def loss(self, g: torch.Generator) -> torch.Tensor:
        if self.phase() == "vsvf":
            return self._vsvf_loss(g)
        return self._affine_loss(g)

    def _affine_loss(self, g: torch.Generator) -> torch.Tensor:
        """The mean of :meth:`_affine_pair_loss` over ``affine_batch`` pairs."""
        batch = self.cfg.affine_batch
        return sum((self._affine_pair_loss(g) for _ in range(batch)), torch.zeros(())) / batch

    def _affine_pair_loss(self, g: torch.Generator) -> torch.Tensor:
        cfg, net = self.cfg, self.model
        # moving: rotation_range(), with its warm-up; fixed: fixed_rotation
        a, b = self._pair_views(g, (None, cfg.fixed_rotation))
        frame = self._frame(a)  # the view keeps its subject's geometry
        steps = 1 if self.phase() == "affine-1" else cfg.affine_recurrent
        use_ncc = self.step < cfg.affine_ncc_steps
        reg_weight = cfg.affine_reg_weight * 0.5 ** (self.step / max(cfg.affine_reg_halflife, 1))
        total = torch.zeros((), device=self.device)
        guide = cfg.affine_guide_weight * max(0.0, 1.0 - self.step / max(cfg.affine_guide_steps, 1))
        finals = []
        hots = None
        if cfg.affine_dice_weight > 0:
            hots = self._label_one_hots(a["labels"], b["labels"], g)
            if hots is not None:
                k = net.affine_net.downsample
                hots = tuple(F.avg_pool3d(h, k, ceil_mode=True) for h in hots)
        for order, (mv, fx) in enumerate(((a, b), (b, a))):
            moving, fixed = mv["image"], fx["image"]
            matrix = net.affine(moving, fixed, frame, steps)[-1]
            warped = net.warp_affine(moving, matrix, frame)
            eye = torch.eye(4, device=matrix.device)
            reg = ((matrix - eye)[:, :3, :] ** 2).sum((1, 2)).mean()
            total = total + self._similarity(warped, fixed, use_ncc) + reg_weight * reg
            if guide > 0:
                total = total + guide * self._guide(matrix, mv["matrix"], fx["matrix"], frame)
            if hots is not None:
                h_moving, h_fixed = hots if order == 0 else hots[::-1]
                warped_labels = net.warp_affine(h_moving, matrix, frame, h_fixed.shape[2:],
                                                padding="zeros")  # fmt: skip
                total = total + cfg.affine_dice_weight * soft_dice(warped_labels, h_fixed)
            finals.append(matrix)
        return total + cfg.affine_sym_weight * affine_symmetry(finals[0], finals[1])

    @staticmethod
    def _guide(
        matrix: torch.Tensor, moving: torch.Tensor, fixed: torch.Tensor, frame: torch.Tensor
    ) -> torch.Tensor:
        """Mean squared distance at the grid's corners (parameter frame) between ``matrix``
        and the affine the views' augmentations imply: fixed view -> its subject's grid ->
        (the same place in the other subject) -> moving view, ``M_m^-1 M_f`` (normalised)."""
        implied = torch.linalg.inv(moving.double()) @ fixed.double()
        target = frame.double() @ implied.to(frame.device) @ torch.linalg.inv(frame.double())
        corners = torch.cartesian_prod(*[torch.tensor([-1.0, 1.0])] * 3).to(frame)
        corners = torch.cat([corners, torch.ones(8, 1, device=frame.device)], 1) @ frame.T
        diff = corners @ (matrix - target.float()).transpose(1, 2)
        return (diff[..., :3] ** 2).sum(-1).mean()

    def _vsvf_loss(self, g: torch.Generator) -> torch.Tensor:
        cfg, net = self.cfg, self.model
        for p in net.affine_net.parameters():
            p.requires_grad_(False)
        a, b = self._pair_views(g, (cfg.vsvf_rotation, cfg.vsvf_rotation))
        frame = self._frame(a)  # the view keeps its subject's geometry
        orders = [(a, b), (b, a)] if cfg.symmetric else [(a, b)]
        hots = self._label_one_hots(a["labels"], b["labels"], g) if cfg.dice_weight > 0 else None
        total = torch.zeros((), device=self.device)
        maps = []
        for k, (mv, fx) in enumerate(orders):
            with torch.no_grad():
                net.affine_net.eval()
                matrix = net.affine(mv["image"], fx["image"], frame, cfg.affine_test_steps)[-1]
            out = net(mv["image"], fx["image"], frame, vsvf_steps=cfg.vsvf_steps, matrix=matrix)
            shape = tuple(fx["image"].shape[2:])
            points = net.full_map(out["displacement"], matrix, frame, shape)
            warped = sample(mv["image"], points, padding="border")
            total = total + self._similarity(warped, fx["image"], global_ncc=False)
            for step in out["passes"]:
                total = total + cfg.momentum_weight * (step.momentum * step.velocity).sum(
                    1).clamp_min(0).mean()  # fmt: skip
            if hots is not None:
                # on the half-resolution grid of the map (label maps averaged over 2^d voxels)
                h_moving, h_fixed = (F.avg_pool3d(h, 2, ceil_mode=True)
                                     for h in (hots if k == 0 else hots[::-1]))  # fmt: skip
                half = net.full_map(out["displacement"], matrix, frame, h_fixed.shape[2:])
                total = total + cfg.dice_weight * soft_dice(sample(h_moving, half), h_fixed)
            maps.append(points)
        if cfg.symmetric:
            total = total + cfg.symmetry_weight * map_symmetry(maps[0], maps[1])
        return total
