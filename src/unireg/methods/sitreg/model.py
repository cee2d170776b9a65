"""SITReg (Honkamaa & Marttinen, MELBA 2024): symmetric, inverse-consistent and
topology-preserving registration by construction.

- :class:`BoundedBSplineUpdate`: a small CNN maps two feature volumes to cubic B-spline
  control points at the features' resolution, squashed by a scaled ``tanh`` below
  :func:`~unireg.spatial.bspline.invertibility_bound`, and upsampled to a displacement field:
  every update is invertible by construction.
- :func:`symmetric_update`: ``f(a, b) o f(b, a)^-1`` and its inverse ``f(b, a) o f(a, b)^-1``
  from the same two network outputs, so swapping the inputs swaps the two exactly.
- :class:`SITReg`: the multi-resolution architecture. Three inference variants:

  - "standard" (training and default): the update predicted at a level is upsampled onto the
    next finer grid and the half-way deformations are composed there, so they are resampled
    from coarser grids as the pass goes on;
  - "complete": every update's B-spline is evaluated directly on the input grid and inverted
    and composed there: the same function without the resampling of coarse fields, for a
    slower pass. On random networks forward and inverse agree more closely (tests); with the
    shipped model, whose coarsest update is almost the identity, both variants give the same
    deformation to 1e-6 mm (README);
  - "fast" (not in the paper): as "standard", but the finest update is evaluated, inverted
    and composed on its own control grid (half the input resolution) and only the final
    forward and inverse fields are upsampled (linearly) to the input grid. No inversion runs
    at the input resolution. Still exactly symmetric and fold-free (tests); with the shipped
    model the same Dice as "standard" on the IXI test pairs for about half the network time,
    and a little less inverse consistent (README).

"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unireg.methods.sitreg import INFERENCE
from unireg.nets.blocks import ConvBlock, conv_nd
from unireg.spatial.bspline import bspline_field, invertibility_bound
from unireg.spatial.field import compose_displacements, resize_displacement
from unireg.spatial.grid import voxel_to_normalized_scale
from unireg.spatial.inversion import invert_displacement
from unireg.spatial.warp import warp


class BoundedBSplineUpdate(nn.Module):
    """``f(a, b)``: features ``(B, C, *S)`` of both images -> an invertible displacement
    ``(B, d, *out_shape)`` (normalised units) by cubic B-spline control points on the feature
    grid, each component bounded by ``fraction`` times the invertibility bound."""

    def __init__(self, ndim: int, channels: int, hidden: int = 32, fraction: float = 0.99):
        super().__init__()
        if not 0 < fraction <= 1:
            raise ValueError("fraction must be in (0, 1]")
        conv = conv_nd(ndim)
        self.ndim, self.fraction = ndim, float(fraction)
        self.net = nn.Sequential(
            conv(2 * channels, hidden, 3, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            conv(hidden, hidden, 3, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            conv(hidden, ndim, 1),
        )
        nn.init.zeros_(self.net[-1].weight)  # start at the identity
        nn.init.zeros_(self.net[-1].bias)

    def control_points(self, a: torch.Tensor, b: torch.Tensor, out_shape: Sequence[int]):
        """Bounded control points (output voxels) and the control spacing (output voxels)."""
        feat = tuple(a.shape[2:])
        spacing = tuple((n - 1) / max(m - 1, 1) for n, m in zip(out_shape, feat, strict=True))
        bound = self.fraction * invertibility_bound(self.ndim, spacing)
        # the paper's feature reparametrisation: the difference and the sum of the two feature
        # volumes (swapping the inputs flips the first half only; a + b == b + a exactly)
        x = torch.cat([a - b, a + b], dim=1)
        if self.ndim == 3:  # oneDNN's 3D convolutions run ~2x faster channels-last on CPU
            x = x.contiguous(memory_format=torch.channels_last_3d)
        raw = self.net(x).contiguous()
        return bound * torch.tanh(raw), spacing, bound

    def forward(self, a: torch.Tensor, b: torch.Tensor, out_shape: Sequence[int]) -> torch.Tensor:
        control, _, _ = self.control_points(a, b, out_shape)
        # one extra control point beyond each end (edge copies): the grid spans the extent
        pad = [1, 1] * self.ndim
        control = F.pad(control, pad, mode="replicate")
        field = bspline_field(control, tuple(out_shape))  # output voxels
        return field * voxel_to_normalized_scale(out_shape, field)


def symmetric_update(
    f: BoundedBSplineUpdate,
    a: torch.Tensor,
    b: torch.Tensor,
    out_shape: Sequence[int],
    *,
    tol: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f(a, b) o f(b, a)^-1, f(b, a) o f(a, b)^-1)``: an update and its inverse.
    ``symmetric_update(f, b, a)`` returns the same two tensors swapped (bit for bit)."""
    n = a.shape[0]
    # both orders in one batch: one network call and one inversion solve for the pair
    u = f(torch.cat([a, b]), torch.cat([b, a]), out_shape)  # [f(a, b); f(b, a)]
    inv = invert_displacement(u, tol=tol)  # [f(a, b)^-1; f(b, a)^-1]
    composed = compose_displacements(u, torch.cat([inv[n:], inv[:n]]))
    return composed[:n], composed[n:]


class _ResidualStage(nn.Module):
    """Strided conv block (halves the grid unless ``stride`` is 1), then a residual block."""

    def __init__(self, ndim: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.down = ConvBlock(ndim, cin, cout, stride=stride)
        conv = conv_nd(ndim)
        self.res = nn.Sequential(
            conv(cout, cout, 3, padding=1), nn.LeakyReLU(0.2), conv(cout, cout, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        return F.leaky_relu(x + self.res(x), 0.2, inplace=True)


class SITReg(nn.Module):
    """The multi-resolution architecture: a ResNet-style feature pyramid shared by both
    images; from the coarsest level to the finest, both feature volumes are deformed half-way
    towards each other, a :func:`symmetric_update` is predicted from them and composed into
    both half-way deformations and their inverses. The forward and inverse deformations compose
    the two half-way ones, so one forward pass gives both directions, and swapping the inputs
    swaps them exactly.

    ``forward(a, b)`` returns ``(forward, inverse)`` normalised displacements on the input
    grid: ``forward`` maps ``b``'s space to ``a``'s (warp ``a`` by it to align it with ``b``),
    ``inverse`` the other way.
    """

    def __init__(
        self,
        ndim: int = 3,
        in_channels: int = 1,
        channels: Sequence[int] = (8, 16, 32, 32),
        hidden: int = 16,
        tol: float = 1e-3,
        stem_stride: int = 1,
    ):
        super().__init__()
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        self.config = {"ndim": ndim, "in_channels": in_channels, "channels": list(channels),
                       "hidden": hidden, "tol": tol, "stem_stride": stem_stride}  # fmt: skip
        self.tol = tol
        stages, cin = [], in_channels
        for i, c in enumerate(channels):
            stages.append(_ResidualStage(ndim, cin, c, stride=stem_stride if i == 0 else 2))
            cin = c
        self.stages = nn.ModuleList(stages)
        # an update per level except one at image resolution (stem_stride 1: the features
        # there only feed the next level, and the last update's B-spline is upsampled onto
        # the input grid); with stem_stride 2 the finest features are at half resolution and
        # predict the last update themselves
        self.first_level = 1 if stem_stride == 1 else 0
        self.updates = nn.ModuleList(
            [BoundedBSplineUpdate(ndim, c, hidden) for c in list(channels)[self.first_level :]]
        )

    @classmethod
    def from_config(cls, config: dict) -> SITReg:
        """The network of a checkpoint's ``model_config``."""
        return cls(**config)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out

    def forward(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        *,
        inference: str = "standard",
        resize: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(forward, inverse)`` by one of the :data:`INFERENCE` variants (see the module
        docstring): "standard"; "complete", every update evaluated, inverted and composed on
        the input grid; "fast", the finest update kept on its own control grid, the two
        results composed there and upsampled (linearly) to the input grid, or, with
        ``resize=False``, returned on that coarser grid (normalised displacements are
        resolution-free: for callers that resample them anyway)."""
        if inference not in INFERENCE:
            raise ValueError(f"unknown SITReg inference {inference!r}; choose from {INFERENCE}")
        if a.shape != b.shape:
            raise ValueError("SITReg takes two images on the same grid (resample first)")
        complete = inference == "complete"
        # both images through the pyramid in one batch (instance norm: no coupling between
        # batch elements, and each element's arithmetic does not depend on its position)
        n = a.shape[0]
        feats = self.features(torch.cat([a, b]))
        fa, fb = [f[:n] for f in feats], [f[n:] for f in feats]
        shape = tuple(a.shape[2:])
        d = a.ndim - 2
        zero = a.new_zeros(a.shape[0], d, *(shape if complete else fa[-1].shape[2:]))
        phi_a = phi_b = inv_a = inv_b = zero
        first = self.first_level
        for level in range(len(self.stages) - 1, first - 1, -1):
            grid = tuple(fa[level].shape[2:])
            # standard: the update lands on the next finer grid (the input grid below level
            # 0); complete: on the input grid; fast: as standard, but the finest update stays
            # on its own grid
            finer = tuple(fa[level - 1].shape[2:]) if level > 0 else shape
            target = shape if complete else finer
            if inference == "fast" and level == first:
                target = grid
            # deform both feature volumes half-way towards each other
            wa = warp(fa[level], _resized(phi_a, grid), padding="border")
            wb = warp(fb[level], _resized(phi_b, grid), padding="border")
            delta, delta_inv = symmetric_update(
                self.updates[level - first], wa, wb, target, tol=self.tol
            )
            phi_a, phi_b, inv_a, inv_b = (_resized(x, target) for x in (phi_a, phi_b, inv_a, inv_b))
            # phi_a <- phi_a o delta, phi_b <- phi_b o delta^-1, and their inverses
            phi_a, inv_a = (
                compose_displacements(phi_a, delta),
                compose_displacements(delta_inv, inv_a),
            )
            phi_b, inv_b = (
                compose_displacements(phi_b, delta_inv),
                compose_displacements(delta, inv_b),
            )
        # composed where the last update landed (the input grid, but for "fast")
        forward = compose_displacements(phi_a, inv_b)  # b's space -> midpoint -> a's space
        inverse = compose_displacements(phi_b, inv_a)
        if not resize:
            return forward, inverse
        return _resized(forward, shape), _resized(inverse, shape)


def _resized(u: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A normalised displacement on ``shape`` (unchanged when already there)."""
    return u if tuple(u.shape[2:]) == tuple(shape) else resize_displacement(u, shape)
