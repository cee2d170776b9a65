"""DIO's feature network: one image in, dense feature maps at 1/4, 1/2 and 1 of its
resolution out, on the solver's pyramid grids.

The network sees one image at a time (shared weights for both images of a pair), so it takes
any shape: the input is zero-padded at the end of each axis to ``4 k + 1`` voxels, where the
stride-2 grids nest exactly (coarse voxel ``i`` on fine voxel ``2 i``), and each output level
is resampled onto the pyramid level of the *unpadded* grid
(:func:`unireg.solvers.pyramid.level_shape`: first and last voxel centres shared), so the
features of factor ``f`` are what the solver's level ``f`` expects.

Backbones (``backbone``):

- ``lku``: large-kernel U-Net (LKU-Net style): every block sums parallel ``3^d``, ``5^d`` and
  ``1^d`` convolutions and the identity, then instance norm and PReLU;
- ``unet``: a plain U-Net (``3^d`` convolution, instance norm, LeakyReLU);
- ``lku-e`` / ``unet-e``: encoder only, each level's head reads the encoder directly.

Each level's head is a plain ``3^d`` convolution to ``features`` channels (no activation).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unireg.nets.blocks import conv_nd, instance_norm_nd, single_channel_conv, upsample_strided
from unireg.solvers.pyramid import level_shape
from unireg.spatial.grid import identity_grid
from unireg.spatial.warp import sample

BACKBONES = ("lku", "unet", "lku-e", "unet-e")
FACTORS = (4.0, 2.0, 1.0)
_CONV = {2: F.conv2d, 3: F.conv3d}


class LargeKernelBlock(nn.Module):
    """``PReLU(IN(conv3(x) + conv5(x) + conv1(x) + x))``, channels kept."""

    def __init__(self, ndim: int, channels: int):
        super().__init__()
        conv = conv_nd(ndim)
        self.k3 = conv(channels, channels, 3, padding=1)
        self.k5 = conv(channels, channels, 5, padding=2)
        self.k1 = conv(channels, channels, 1)
        self.norm = instance_norm_nd(ndim)(channels, affine=True)
        self.act = nn.PReLU(channels)

        self.merged: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged is not None:
            out: torch.Tensor = self.act(self.norm(self.merged(x)))
        else:
            out = self.act(self.norm(self.k3(x) + self.k5(x) + self.k1(x) + x))
        return out

    def merge(self) -> None:
        """Fold the four parallel branches into one ``5^d`` convolution with the same output
        (structural re-parameterisation: the ``3^d`` and ``1^d`` kernels and the identity
        are zero-padded to ``5^d`` and added). For inference: the branches' parameters stay
        but no longer train the block."""
        d = self.k5.weight.ndim - 2
        with torch.no_grad():
            weight = self.k5.weight.clone()
            weight += F.pad(self.k3.weight, [1, 1] * d)
            weight += F.pad(self.k1.weight, [2, 2] * d)
            centre = (slice(None), slice(None)) + (2,) * d
            weight[centre] += torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)
            assert self.k5.bias is not None and self.k3.bias is not None
            assert self.k1.bias is not None
            merged = conv_nd(d)(weight.shape[1], weight.shape[0], 5, padding=2)
            merged = merged.to(weight)
            merged.weight.copy_(weight)
            merged.bias.copy_(self.k5.bias + self.k3.bias + self.k1.bias)
        self.merged = merged


class PlainBlock(nn.Sequential):
    """``3^d`` convolution, instance norm, LeakyReLU (0.2); channels kept."""

    def __init__(self, ndim: int, channels: int):
        super().__init__(
            conv_nd(ndim)(channels, channels, 3, padding=1),
            instance_norm_nd(ndim)(channels, affine=True),
            nn.LeakyReLU(0.2),
        )


def _transition(ndim: int, cin: int, cout: int, stride: int, large: bool) -> nn.Sequential:
    """A ``3^d`` convolution changing the channels (stride 2 halves the grid), norm,
    activation."""
    return nn.Sequential(
        conv_nd(ndim)(cin, cout, 3, stride=stride, padding=1),
        instance_norm_nd(ndim)(cout, affine=True),
        nn.PReLU(cout) if large else nn.LeakyReLU(0.2),
    )


class FeatureNet(nn.Module):
    """Dense multi-scale features of one image.

    Args:
        ndim: 2 or 3.
        channels: widths of the three resolution levels (full, 1/2, 1/4).
        features: channels of every output level.
        backbone: one of :data:`BACKBONES`.
    """

    def __init__(
        self,
        ndim: int = 3,
        channels: Sequence[int] = (8, 16, 32),
        features: int = 16,
        backbone: str = "lku",
    ):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
        if len(channels) != 3:
            raise ValueError(f"give 3 channel widths (full, 1/2, 1/4), got {list(channels)}")
        self.is_merged = False
        self.is_channels_last = False
        self.config: dict[str, Any] = {"ndim": ndim, "channels": [int(c) for c in channels],
                                       "features": int(features), "backbone": backbone}  # fmt: skip
        large = backbone.startswith("lku")
        self.decoder = not backbone.endswith("-e")
        block = LargeKernelBlock if large else PlainBlock
        c0, c1, c2 = (int(c) for c in channels)
        conv = conv_nd(ndim)
        self.stem = _transition(ndim, 1, c0, 1, large)
        self.enc0 = block(ndim, c0)
        self.down1 = _transition(ndim, c0, c1, 2, large)
        self.enc1 = block(ndim, c1)
        self.down2 = _transition(ndim, c1, c2, 2, large)
        self.enc2 = block(ndim, c2)
        if self.decoder:
            self.fuse1 = _transition(ndim, c2 + c1, c1, 1, large)
            self.dec1 = block(ndim, c1)
            self.fuse0 = _transition(ndim, c1 + c0, c0, 1, large)
            self.dec0 = block(ndim, c0)
        self.heads = nn.ModuleDict({
            "4": conv(c2, features, 3, padding=1),
            "2": conv(c1, features, 3, padding=1),
            "1": conv(c0, features, 3, padding=1),
        })  # fmt: skip

    def merged(self) -> FeatureNet:
        """A copy for inference whose large-kernel blocks each run one ``5^d`` convolution
        (:meth:`LargeKernelBlock.merge`): the same features to float rounding, a quarter of
        the full-resolution work less."""
        net = copy.deepcopy(self).eval()
        for block in net.modules():
            if isinstance(block, LargeKernelBlock):
                block.merge()
        net.is_merged = True
        return net

    def channels_last(self, coarsest: bool = True) -> FeatureNet:
        """Lay the trunk's 3D convolution weights out channels-last, in place (the heads keep
        theirs); :meth:`trunk` then lays its input out so too and returns its levels in the
        default layout: the same features to float rounding, faster where
        :func:`~unireg.methods.pipeline.channels_last_pays` says so (oneDNN's bfloat16 CPU
        convolutions about a fifth). ``coarsest=False`` leaves the 1/4 level's block in the
        default layout: in float32 on an AVX2 CPU its ``5^d`` convolution of 32 channels over
        31x31x24 voxels takes 36-40 ms so against 52-56 ms channels-last (2 threads), and
        ``lku-e``'s two feature maps of an IXI pair 1.24 -> 1.17 s (``lku`` 2.48 -> 2.38 s). A 2D
        network is returned unchanged."""
        if self.config["ndim"] == 3:
            for name, module in self.named_children():
                if name != "heads" and (coarsest or name != "enc2"):
                    module.to(memory_format=torch.channels_last_3d)
            self.is_channels_last = True
        return self

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FeatureNet:
        """The network a checkpoint's ``model_config`` describes."""
        return cls(config["ndim"], config["channels"], config["features"], config["backbone"])

    def forward(
        self, image: torch.Tensor, factors: Sequence[float] = FACTORS
    ) -> dict[float, torch.Tensor]:
        """Features of ``image`` ``(B, 1, *shape)`` (intensities about [0, 1]) by pyramid
        factor: ``{4.0: (B, F, *level_shape(shape, 4)), 2.0: ..., 1.0: (B, F, *shape)}``, for
        the ``factors`` asked for (the decoder's full-resolution part runs only for 1)."""
        trunk = self.trunk(image, factors)
        return {f: self.head(trunk, f) for f in sorted(trunk.levels, reverse=True)}

    def trunk(self, image: torch.Tensor, factors: Sequence[float] = FACTORS) -> Trunk:
        """Everything but the heads: each asked-for level's last activation on the padded
        input's stride grid (see :meth:`head`)."""
        d = image.ndim - 2
        if image.shape[1] != 1 or d != self.config["ndim"]:
            raise ValueError(f"expected (B, 1) {self.config['ndim']}D images, got {image.shape}")
        unknown = set(map(float, factors)) - set(FACTORS)
        if unknown or not factors:
            raise ValueError(f"factors must be among {FACTORS}, got {list(factors)}")
        shape = tuple(image.shape[2:])
        padded = [4 * ((n + 2) // 4) + 1 for n in shape]  # the smallest 4 k + 1 >= n
        pads: list[int] = []
        for n, m in zip(reversed(shape), reversed(padded), strict=True):
            pads += [0, m - n]
        fmt = torch.channels_last_3d if self.is_channels_last else torch.contiguous_format
        stem = single_channel_conv(self.stem[0], F.pad(image, pads), fmt)
        e0 = self.enc0(self.stem[1:](stem))
        e1 = self.enc1(self.down1(e0))
        e2 = self.enc2(self.down2(e1))
        full = 1.0 in set(map(float, factors))
        if self.decoder:
            # channels-last: the upsampling and the concatenation made in that layout (the
            # convolution would otherwise copy the concatenated input into it: lku's
            # full-resolution fusion 563 -> 357 ms an image, 2 threads, float32)
            up = upsample_strided(e2.contiguous(memory_format=fmt), e1.shape[2:])
            e1 = self.dec1(self.fuse1(torch.cat([up, e1.contiguous(memory_format=fmt)], 1)))
            if full:
                up = upsample_strided(e1.contiguous(memory_format=fmt), e0.shape[2:])
                e0 = self.dec0(self.fuse0(torch.cat([up, e0.contiguous(memory_format=fmt)], 1)))
        levels = dict(zip(FACTORS, (e2, e1, e0), strict=True))
        return Trunk({float(f): levels[float(f)].contiguous() for f in factors}, shape, padded)

    def head(
        self,
        trunk: Trunk,
        factor: float,
        basis: torch.Tensor | None = None,
        every: int = 1,
    ) -> torch.Tensor:
        """Level ``factor``'s features from ``trunk`` on the solver's pyramid grid.

        ``basis`` ``(k, F)``: the features projected onto its rows
        (:func:`~unireg.solvers.pyramid.project_channels`), computed as such (the head is
        linear, so its ``k`` projected kernels give exactly the projected features at a
        ``k / F`` of the cost). ``every`` > 1 (full resolution only): the features at every
        ``every``-th voxel of the input grid along each axis (a sample, e.g. to estimate a
        basis)."""
        conv = self.heads[str(int(factor))]
        weight, bias = conv.weight, conv.bias
        if basis is not None:
            weight = torch.einsum("kc,c...->k...", basis.to(weight), weight)
            bias = None if bias is None else basis.to(bias) @ bias
        x = trunk.levels[factor]
        d = x.ndim - 2
        if self.is_channels_last and d == 3 and 2 * weight.shape[0] <= x.shape[1]:
            # a head to at most half its input channels (the projected ones) runs channels-last,
            # its input laid out so and its output back: 8 -> 2-4 channels over 121x121x93
            # voxels 69 -> 43-53 ms (2 threads; 8 -> 16: 89 -> 113 ms, so not there)
            x = x.contiguous(memory_format=torch.channels_last_3d)
            weight = weight.contiguous(memory_format=torch.channels_last_3d)
        if every > 1:
            if factor != 1:
                raise ValueError("a sampled head is for the full-resolution level only")
            feats = _CONV[d](x, weight, bias, stride=every, padding=1).contiguous()
            for axis, n in enumerate(trunk.shape):  # drop the padding
                feats = feats.narrow(2 + axis, 0, -(-n // every))
            return feats
        feats = _CONV[d](x, weight, bias, padding=1).contiguous()
        return _onto_level(feats, trunk.shape, trunk.padded, factor)


@dataclass
class Trunk:
    """:meth:`FeatureNet.trunk`'s output: the last activation of each level asked for (on the
    stride grid of the input zero-padded to ``padded``), and the input's ``shape``."""

    levels: dict[float, torch.Tensor]
    shape: tuple[int, ...]
    padded: list[int]


def _onto_level(
    feats: torch.Tensor, shape: tuple[int, ...], padded: list[int], factor: float
) -> torch.Tensor:
    """Features on the stride grid of the padded input (voxel ``i`` at padded voxel
    ``factor * i``) resampled linearly onto the pyramid level ``factor`` of ``shape``."""
    target = level_shape(shape, factor)
    if factor == 1:
        for axis, n in enumerate(shape):  # drop the padding
            feats = feats.narrow(2 + axis, 0, n)
        return feats
    # pyramid voxel j lies at input voxel j (n - 1) / (m - 1), that is at stride-grid voxel
    # j (n - 1) / ((m - 1) factor); in the stride grid's normalised units (m' voxels):
    # -1 + 2 * that / (m' - 1)
    grid = identity_grid(target, device=feats.device, dtype=feats.dtype)  # [-1, 1] per axis
    scale = []
    for n, m, coarse in zip(shape, target, feats.shape[2:], strict=True):
        reach = (n - 1) / factor  # stride-grid voxels spanned by the level
        scale.append(reach / max(coarse - 1, 1) if m > 1 else 0.0)
    s = torch.tensor(scale, dtype=feats.dtype, device=feats.device)
    points = (grid + 1) * s - 1  # voxel 0 stays at -1; the last at -1 + 2 reach / (m' - 1)
    return sample(feats, points.expand(feats.shape[0], *points.shape[1:]), padding="border")
