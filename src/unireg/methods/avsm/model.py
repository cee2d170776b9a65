"""AVSM's networks: the recurrent multi-step affine network, the momentum U-Net and the
vector-momentum stationary velocity field (vSVF), composed as maps in one forward pass.

Frames. Both images lie on grids of one shape and spacing (the network's training grid, each
placed on its own head). The affine network works in the *parameter frame*: world millimetres
about the grid's centre divided by ``length_mm``, so ``p = L x / length_mm`` for a normalised
point ``x`` (``L`` the grid's normalised-to-world linear part). An affine ``M`` in that frame
is ``K^-1 M K`` in the normalised frame (``K = L / length_mm``). The vSVF stage works on the
normalised frame of the fixed grid at the momentum's resolution (half the grid's).

The output map is ``Phi = A o psi_1 o ... o psi_k``, fixed normalised -> moving normalised:
``A`` the composed affine, ``psi_j = phi_-1`` the map advected by the j-th velocity; the
moving image is sampled once, through ``Phi``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unireg.nets.blocks import ConvBlock, conv_nd
from unireg.spatial.field import (
    advect_displacement,
    compose_displacements,
    displacement_to_points,
    resize_displacement,
)
from unireg.spatial.filters import multi_gaussian_blur
from unireg.spatial.grid import transform_points
from unireg.spatial.warp import Padding, sample, warp_affine

# mermaid's multi-Gaussian kernel: widths as fractions of the grid's smallest side (the
# "unit cube"), the wider ones weighted more; the weights sum to one
SIGMAS = (0.05, 0.1, 0.15, 0.2, 0.25)
WEIGHTS = (1 / 15, 2 / 15, 3 / 15, 4 / 15, 5 / 15)


def compose_step(update: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """``A_t = A~ A_(t-1)``, ``b_t = A~ b_(t-1) + b~``: the homogeneous product
    ``update @ previous`` (``(B, d+1, d+1)``): the previous map first, then the update."""
    return update @ previous


def parameter_frame(linear: torch.Tensor, length_mm: float) -> torch.Tensor:
    """``K`` ``(d+1, d+1)``: normalised point -> parameter-frame point (``L x / length_mm``,
    ``linear`` = ``L``, the grid's normalised-to-world linear part, mm)."""
    d = linear.shape[0]
    k = torch.eye(d + 1, dtype=linear.dtype, device=linear.device)
    k[:d, :d] = linear / length_mm
    return k


def to_normalized(matrix: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
    """A parameter-frame affine ``(B, d+1, d+1)`` in the normalised frame: ``K^-1 M K``."""
    return torch.linalg.inv(frame) @ matrix @ frame


class AffineNet(nn.Module):
    """One step of the affine network: a shared encoder on each image (to 1/4), the two
    concatenated, strided convolutions to ``channels[3]`` channels (the paper's 4), pooled to
    ``pool^d`` cells, two fully connected layers to ``d*d + d`` numbers: the update
    ``A~ = I + dA``, ``b~`` (parameter frame). The last layer starts at zero: an untrained
    step is the identity."""

    def __init__(
        self, ndim: int, channels: Sequence[int], hidden: int, pool: int = 4, downsample: int = 1
    ):
        super().__init__()
        conv = conv_nd(ndim)
        c0, c1, c2, c3 = channels
        self.downsample = downsample
        act = nn.LeakyReLU(0.2)
        self.encoder = nn.Sequential(
            conv(1, c0, 3, stride=2, padding=1), act, conv(c0, c1, 3, stride=2, padding=1), act
        )
        self.joint = nn.Sequential(
            conv(2 * c1, c2, 3, stride=2, padding=1), act, conv(c2, c3, 3, stride=2, padding=1),
            act, (nn.AdaptiveAvgPool2d if ndim == 2 else nn.AdaptiveAvgPool3d)(pool),
        )  # fmt: skip
        self.fc = nn.Sequential(nn.Linear(c3 * pool**ndim, hidden), act)
        self.out = nn.Linear(hidden, ndim * ndim + ndim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.ndim = ndim

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """The shared encoder's features of one image (1/4 of the input's resolution, after
        averaging over ``downsample^d`` voxels)."""
        if self.downsample > 1:
            pool = F.avg_pool2d if image.ndim == 4 else F.avg_pool3d
            image = pool(image, self.downsample, ceil_mode=True)
        out: torch.Tensor = self.encoder(image)
        return out

    def forward(
        self, moving: torch.Tensor, fixed: torch.Tensor, fixed_code: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The update ``(B, d+1, d+1)`` (parameter frame) from the two images
        (``fixed_code``: :meth:`encode` of ``fixed``, when already computed)."""
        d = self.ndim
        code = self.encode(fixed) if fixed_code is None else fixed_code
        features = torch.cat([self.encode(moving), code], 1)
        raw = self.out(self.fc(self.joint(features).flatten(1)))
        batch = raw.shape[0]
        update = torch.eye(d + 1, dtype=raw.dtype, device=raw.device).repeat(batch, 1, 1)
        update[:, :d, :d] = update[:, :d, :d] + raw[:, : d * d].view(batch, d, d)
        update[:, :d, d] = raw[:, d * d :]
        return update


class MomentumNet(nn.Module):
    """A U-Net on the (affinely warped) moving image and the fixed image, giving the vector
    momentum ``(B, d, *half)`` on the half-resolution grid (voxel ``j`` on input voxel
    ``2 j``). The last layer starts at zero: an untrained network gives no deformation."""

    def __init__(self, ndim: int, channels: Sequence[int]):
        super().__init__()
        chans = list(channels)
        self.down = nn.ModuleList()
        cin = 2
        for c in chans:
            block = nn.Sequential(ConvBlock(ndim, cin, c, stride=2), ConvBlock(ndim, c, c))
            self.down.append(block)
            cin = c
        self.up = nn.ModuleList()
        for skip in reversed(chans[:-1]):
            self.up.append(ConvBlock(ndim, cin + skip, skip))
            cin = skip
        self.out = conv_nd(ndim)(cin, ndim, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        x = torch.cat([moving, fixed], 1)
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        mode = "bilinear" if x.ndim == 4 else "trilinear"
        for block, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[2:], mode=mode, align_corners=True)
            x = block(torch.cat([x, skip], 1))
        out: torch.Tensor = self.out(x)
        return out


@dataclass
class VSVFResult:
    """One vSVF pass: the map's displacement (normalised, half-resolution fixed grid), the
    momentum, the velocity and the inverse displacement of this step's deformation."""

    displacement: torch.Tensor
    momentum: torch.Tensor
    velocity: torch.Tensor
    inverse: torch.Tensor | None


def velocity_bound(shape: Sequence[int], steps: int, cfl: float) -> torch.Tensor:
    """Per-axis bound on a velocity's normalised magnitude: ``cfl`` voxels per integration
    step (``steps`` per unit time), ``(d,)``."""
    return torch.tensor([cfl * steps * 2.0 / max(n - 1, 1) for n in shape])


class AVSM(nn.Module):
    """The whole model: :class:`AffineNet` (weights shared across steps), :class:`MomentumNet`
    and the vSVF integration (no weights).

    Args:
        ndim: 2 or 3.
        shape: the training grid's shape (the kernel widths are fractions of its smallest
            side, fixed in voxels of the half-resolution grid).
        affine_channels, affine_hidden: the affine network; ``affine_downsample``: it sees
            the images averaged over ``affine_downsample^d`` voxels (2: 4 mm on a 2 mm grid).
        momentum_channels: the U-Net's channels, one stride-2 level each.
        length_mm: the parameter frame's unit (mm).
        integration_steps: RK4 steps of the advection; ``cfl``: the velocity bound in voxels
            per step (a smooth bound: ``c tanh(v / c)``).
        sigmas, weights: the multi-Gaussian kernel (widths as fractions of the smallest side).
    """

    def __init__(
        self,
        ndim: int = 3,
        shape: Sequence[int] = (96, 112, 96),
        affine_channels: Sequence[int] = (8, 16, 16, 4),
        affine_hidden: int = 32,
        affine_downsample: int = 2,
        momentum_channels: Sequence[int] = (16, 32, 32, 32),
        length_mm: float = 100.0,
        integration_steps: int = 10,
        cfl: float = 0.5,
        sigmas: Sequence[float] = SIGMAS,
        weights: Sequence[float] = WEIGHTS,
    ):
        super().__init__()
        self.config: dict[str, Any] = {
            "ndim": ndim, "shape": list(shape), "affine_channels": list(affine_channels),
            "affine_hidden": affine_hidden, "affine_downsample": affine_downsample,
            "momentum_channels": list(momentum_channels),
            "length_mm": length_mm, "integration_steps": integration_steps, "cfl": cfl,
            "sigmas": list(sigmas), "weights": list(weights),
        }  # fmt: skip
        self.affine_net = AffineNet(
            ndim, affine_channels, affine_hidden, downsample=affine_downsample
        )
        self.momentum_net = MomentumNet(ndim, momentum_channels)
        half = [(n + 1) // 2 for n in shape]
        self.sigma_voxels = [s * (min(half) - 1) for s in sigmas]
        self.ndim = ndim

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AVSM:
        return cls(**config)

    # -- affine --------------------------------------------------------------------------
    def affine(
        self, moving: torch.Tensor, fixed: torch.Tensor, frame: torch.Tensor, steps: int
    ) -> list[torch.Tensor]:
        """The composed affine after each of ``steps`` recurrent steps, parameter frame
        (``(B, d+1, d+1)`` each): step ``t`` sees the original ``moving`` warped by the
        affine composed so far. ``frame``: :func:`parameter_frame` of the grid."""
        d = self.ndim
        batch = moving.shape[0]
        current = torch.eye(d + 1, dtype=moving.dtype, device=moving.device).repeat(batch, 1, 1)
        out = []
        code = self.affine_net.encode(fixed)  # the fixed image's features: once for all steps
        for t in range(steps):
            warped = moving if t == 0 else self.warp_affine(moving, current, frame)
            current = compose_step(self.affine_net(warped, fixed, code), current)
            out.append(current)
        return out

    @staticmethod
    def warp_affine(
        image: torch.Tensor, matrix: torch.Tensor, frame: torch.Tensor,
        shape: Sequence[int] | None = None, *, padding: Padding = "border",
    ) -> torch.Tensor:  # fmt: skip
        """``image`` sampled through a parameter-frame affine onto a grid of ``shape`` (its own
        by default; :func:`unireg.spatial.warp.warp_affine`). Border padding by default: the
        background continues."""
        out = None if shape is None else tuple(shape)
        return warp_affine(image, to_normalized(matrix, frame), out, padding=padding)

    # -- vSVF ----------------------------------------------------------------------------
    def velocity(self, momentum: torch.Tensor) -> torch.Tensor:
        """``v = K * m`` (multi-Gaussian, zero outside the grid), smoothly bounded by the CFL
        bound per axis."""
        v = multi_gaussian_blur(momentum, self.sigma_voxels, self.config["weights"])
        shape = tuple(momentum.shape[2:])
        bound = velocity_bound(shape, self.config["integration_steps"], self.config["cfl"])
        bound = bound.to(v).view(1, -1, *[1] * len(shape))
        return bound * torch.tanh(v / bound)

    def vsvf(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        start: torch.Tensor | None,
        *,
        inverse: bool = False,
    ) -> VSVFResult:
        """One vSVF pass on ``moving`` (already warped by the map so far) and ``fixed``: the
        momentum, its velocity and the map advected from ``start`` (the displacement so far
        on the half-resolution grid; identity when None). ``inverse``: also the inverse of
        this pass's deformation (``-v`` integrated from the identity)."""
        momentum = self.momentum_net(moving, fixed)
        v = self.velocity(momentum)
        steps = int(self.config["integration_steps"])
        u = advect_displacement(v, start, steps=steps)
        inv = advect_displacement(-v, None, steps=steps) if inverse else None
        return VSVFResult(u, momentum, v, inv)

    def full_map(
        self, displacement: torch.Tensor, matrix: torch.Tensor, frame: torch.Tensor,
        shape: Sequence[int],
    ) -> torch.Tensor:  # fmt: skip
        """The point map ``A o (id + u)`` on a grid of ``shape`` (the half-resolution
        ``displacement`` resized), fixed normalised -> moving normalised: ``(B, *shape, d)``."""
        if tuple(displacement.shape[2:]) != tuple(shape):
            displacement = resize_displacement(displacement, tuple(shape))
        return transform_points(to_normalized(matrix, frame), displacement_to_points(displacement))

    def forward(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        frame: torch.Tensor,
        *,
        affine_steps: int = 7,
        vsvf_steps: int = 2,
        inverse: bool = False,
        matrix: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Register ``moving`` onto ``fixed`` (``(B, 1, *shape)``, intensities in [0, 1], one
        grid shape): the affine after each of ``affine_steps`` steps (or the given parameter-
        frame ``matrix``, the affine network then not run), and for each of ``vsvf_steps``
        vSVF passes its :class:`VSVFResult` with the composed displacement so far;
        ``inverse``: the inverse displacement of the whole deformation (half-resolution,
        ``psi^-1``)."""
        affines = []
        if matrix is None:
            if affine_steps:
                affines = self.affine(moving, fixed, frame, affine_steps)
                matrix = affines[-1]
            else:
                d = self.ndim
                eye = torch.eye(d + 1, dtype=moving.dtype, device=moving.device)
                matrix = eye.expand(moving.shape[0], -1, -1)
        passes: list[VSVFResult] = []
        shape = tuple(moving.shape[2:])
        u: torch.Tensor | None = None
        inv: torch.Tensor | None = None
        for _ in range(vsvf_steps):
            if u is None:
                warped = self.warp_affine(moving, matrix, frame)
            else:
                warped = sample(moving, self.full_map(u, matrix, frame, shape), padding="border")
            step = self.vsvf(warped, fixed, u, inverse=inverse)
            u = step.displacement
            if inverse and step.inverse is not None:
                # (psi_1 o ... o psi_k)^-1 = psi_k^-1 o ... o psi_1^-1: the newest one last
                inv = step.inverse if inv is None else compose_displacements(step.inverse, inv)
            passes.append(step)
        return {"affines": affines, "matrix": matrix, "passes": passes, "displacement": u,
                "inverse": inv}  # fmt: skip
