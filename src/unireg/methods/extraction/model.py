"""The brain-mask network: a small 3D U-Net that maps an image of any contrast on a coarse
RAS grid to the logit of each voxel being brain."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from unireg.nets.blocks import ConvBlock, conv_nd, upsample_strided


class BrainMaskNet(nn.Module):
    """U-Net: per level two 3^3 :class:`~unireg.nets.blocks.ConvBlock` s, stride-2 blocks
    between levels, linear upsampling and skip concatenation on the way up, a 1^3 output
    convolution. Input ``(B, 1, *shape)`` intensities in [0, 1], any shape; output the brain
    logits ``(B, 1, *shape)`` on the same grid.

    Args:
        ndim: 2 or 3.
        channels: feature channels per level, finest first (one stride-2 step per extra level).
    """

    def __init__(self, ndim: int = 3, channels: Sequence[int] = (8, 16, 32, 64)) -> None:
        super().__init__()
        if len(channels) < 2 or min(channels) < 1:
            raise ValueError(f"channels must list at least 2 positive sizes, got {channels}")
        self.config: dict[str, Any] = {"ndim": ndim, "channels": [int(c) for c in channels]}
        c = list(channels)
        self.enc = nn.ModuleList()
        for i, cout in enumerate(c):
            cin = 1 if i == 0 else c[i - 1]
            first = ConvBlock(ndim, cin, cout, stride=1 if i == 0 else 2)
            self.enc.append(nn.Sequential(first, ConvBlock(ndim, cout, cout)))
        self.dec = nn.ModuleList(
            ConvBlock(ndim, c[i + 1] + c[i], c[i]) for i in reversed(range(len(c) - 1))
        )
        self.head = conv_nd(ndim)(c[0], 1, 1)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BrainMaskNet:
        return cls(int(config["ndim"]), config["channels"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.enc:
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for block in self.dec:
            skip = skips.pop()
            x = block(torch.cat([upsample_strided(x, skip.shape[2:]), skip], dim=1))
        return self.head(x)
