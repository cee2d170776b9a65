"""Convolution blocks for 2D and 3D networks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def conv_nd(ndim: int) -> type[nn.Module]:
    """``nn.Conv2d`` or ``nn.Conv3d``."""
    if ndim not in (2, 3):
        raise ValueError(f"networks are 2D or 3D, got {ndim}")
    return nn.Conv2d if ndim == 2 else nn.Conv3d


def instance_norm_nd(ndim: int) -> type[nn.Module]:
    """``nn.InstanceNorm2d`` or ``nn.InstanceNorm3d``."""
    return nn.InstanceNorm2d if ndim == 2 else nn.InstanceNorm3d


def single_channel_conv(
    conv: nn.Module, x: torch.Tensor, memory_format: torch.memory_format
) -> torch.Tensor:
    """``conv(x)`` for a one-channel input ``x`` laid out in ``memory_format``. PyTorch's CPU
    heuristic sends a float32 3D convolution with a kernel of at most 3 per axis to its slow
    reference kernel unless ``batch x channels x depth x height`` exceeds 20480; for one
    image of one channel that leaves most brain volumes there. With a zero second channel
    (and zero weights for it) the product doubles and oneDNN takes volumes with more than
    10240 voxels over its first two axes (depth x height): the same output 3-4 times
    faster (8 channels over 121x121x93 voxels, 2 threads: 141 -> 52 ms, channels-last
    157 -> 40 ms). Other inputs and devices, autocast and 2D networks call ``conv`` as it
    is."""
    assert isinstance(conv, nn.Conv3d | nn.Conv2d)
    weight, bias = conv.weight, conv.bias
    if (
        x.ndim == 5 and x.shape[:2] == (1, 1) and x.device.type == "cpu"
        and x.dtype == torch.float32 and weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
    ):  # fmt: skip
        x = torch.cat([x, torch.zeros_like(x)], 1).contiguous(memory_format=memory_format)
        weight = torch.cat([weight, torch.zeros_like(weight)], 1)
        weight = weight.contiguous(memory_format=memory_format)
        out: torch.Tensor = conv._conv_forward(x, weight, bias)  # type: ignore[operator]
        return out
    return conv(x.contiguous(memory_format=memory_format))


class ConvBlock(nn.Sequential):
    """Convolution (kernel 3, or ``kernel``), instance norm (affine), ReLU; ``stride`` 2 halves
    the grid (output voxel ``j`` is centred on input voxel ``2 j``)."""

    def __init__(self, ndim: int, cin: int, cout: int, *, stride: int = 1, kernel: int = 3):
        super().__init__(
            conv_nd(ndim)(cin, cout, kernel, stride=stride, padding=kernel // 2),
            instance_norm_nd(ndim)(cout, affine=True),
            nn.ReLU(inplace=True),
        )


def upsample_strided(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Linear upsampling of ``x`` ``(B, C, *coarse)`` onto the grid ``shape`` it was made from
    by a stride-2 block: coarse voxel ``i`` sits on fine voxel ``2 i`` (as :class:`ConvBlock`
    with ``stride=2`` places it), fine voxel ``j`` takes the value at coarse ``j / 2``, and a
    fine voxel past the last coarse one repeats the edge.

    One axis at a time: the coarse values interleaved with their neighbours' means (the values
    of ``F.interpolate(..., align_corners=True)`` onto ``2 n - 1`` voxels), in ``x``'s dtype;
    against the trilinear kernel on an AVX2 CPU (2 threads, default layout): in bfloat16
    1.5-3.5x faster (16 channels onto 121x121x93 voxels 114 against 176 ms, onto 47x55x47
    4.5 against 13.6 ms); in float32 faster onto 47x55x47 (4.7 against 10.5 ms), slower onto
    61x61x47 and larger grids (16 channels onto 121x121x93: 223 against 146 ms). A float32
    3D input laid out channels-last on a CPU, onto ``2 n - 1`` voxels per axis, takes the
    trilinear kernel (the same values; vectorised over the channels in that layout, and its
    output stays channels-last: 16 channels onto 121x121x93 voxels 242 -> 113 ms)."""
    coarse = x.shape[2:]
    if len(shape) != len(coarse) or any(
        not 2 * c - 1 <= n <= 2 * c for c, n in zip(coarse, shape, strict=True)
    ):
        raise ValueError(f"{tuple(shape)} is not the stride-2 parent grid of {tuple(coarse)}")
    if (
        x.ndim == 5
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last_3d)
        and all(n == 2 * c - 1 and c > 1 for c, n in zip(coarse, shape, strict=True))
    ):
        return F.interpolate(x, size=tuple(shape), mode="trilinear", align_corners=True)
    for axis, n in enumerate(shape):
        dim, c = axis + 2, x.shape[axis + 2]
        if c == 1:  # a single coarse voxel: repeated
            x = x.expand(*x.shape[:dim], n, *x.shape[dim + 1 :]).contiguous()
            continue
        lo, hi = x.narrow(dim, 0, c - 1), x.narrow(dim, 1, c - 1)
        pairs = torch.stack([lo, (lo + hi) * 0.5], dim=dim + 1)  # (..., c - 1, 2, ...)
        edge = x.narrow(dim, c - 1, 1)
        parts = [pairs.flatten(dim, dim + 1), edge] + [edge] * (n - (2 * c - 1))
        x = torch.cat(parts, dim=dim)
    return x


def upsample_mass(x: torch.Tensor) -> torch.Tensor:
    """Linear upsampling by 2 of non-negative maps ``(B, C, *n)`` with zeros outside, onto the
    ``2 n + 1`` fine voxels from one before the first coarse voxel to one after the last
    (coarse voxel ``i`` on fine voxel ``2 i + 1``): each coarse value spreads as the hat
    ``[1/2, 1, 1/2]``, so every map's centre of mass stays exactly where it was."""
    d = x.ndim - 2
    mode = "bilinear" if d == 2 else "trilinear"
    padded = F.pad(x, [1, 1] * d)
    up = F.interpolate(
        padded, size=[2 * n - 1 for n in padded.shape[2:]], mode=mode, align_corners=True
    )
    return up[(..., *[slice(1, -1)] * d)]
