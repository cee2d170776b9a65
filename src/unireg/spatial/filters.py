"""Separable filters on ``(B, C, *spatial)`` tensors (2D and 3D): box sums, Gaussian blur and
finite differences. One implementation, used by the losses (local NCC), the regularisers, the
augmentation and the synthesis. All filters act per channel, on the device of the input, and are
differentiable.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _per_axis(value: float | Sequence[float], ndim: int, name: str) -> list[float]:
    values = [value] * ndim if isinstance(value, int | float) else list(value)
    if len(values) != ndim:
        raise ValueError(f"{name} needs 1 or {ndim} values, got {len(values)}")
    return [float(v) for v in values]


class _Correlate(torch.autograd.Function):
    """Valid 1D correlation along one dimension by shifted multiply-adds (no im2col): on CPUs
    3-7x faster than a depthwise ``conv3d`` with a ``(k, 1, 1)`` kernel. The backward pass is
    the exact adjoint (the same shifted adds, scattered), so it costs the same as the forward.
    The kernel is a constant (no gradient)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, taps: list[float], dim: int, dilation: int, stride: int
    ) -> torch.Tensor:
        n = x.shape[dim] - dilation * (len(taps) - 1)
        out = x.narrow(dim, 0, n) * taps[0]
        for i, w in enumerate(taps[1:], start=1):
            out.add_(x.narrow(dim, i * dilation, n), alpha=w)
        ctx.settings = (taps, dim, dilation, stride, x.shape[dim], n)
        if stride > 1:  # keep every stride-th output, as a strided convolution does
            out = out[(slice(None),) * dim + (slice(None, None, stride),)].contiguous()
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        taps, dim, dilation, stride, size, n = ctx.settings
        if stride > 1:  # scatter the strided outputs back onto the dense valid positions
            shape = list(grad.shape)
            shape[dim] = n
            dense = grad.new_zeros(shape)
            dense[(slice(None),) * dim + (slice(None, None, stride),)] = grad
            grad = dense
        shape = list(grad.shape)
        shape[dim] = size
        out = grad.new_zeros(shape)
        for i, w in enumerate(taps):
            out.narrow(dim, i * dilation, n).add_(grad, alpha=w)
        return out, None, None, None, None


class _CorrelateSame(torch.autograd.Function):
    """A "same"-size 1D correlation along one dimension, zero or replicate padding, by
    shifted multiply-adds straight from the input: output ``i`` is ``sum_j w_j x[i + o_j]``
    with ``o_j = j dilation - reach // 2`` and ``x`` beyond the ends 0 (``zeros``) or the
    end value (``replicate``). No padded copy of the input is made (on CPUs a replicate pad
    of a 3D field costs more than the filter's adds). The backward pass is the exact
    adjoint, written with differentiable operations (so it has a gradient itself)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        taps: Sequence[float],
        dim: int,
        dilation: int,
        replicate: bool,
    ) -> torch.Tensor:
        ctx.settings = (taps, dim, dilation, replicate)
        return _correlate_same(x, taps, dim, dilation, replicate, adjoint=False)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        taps, dim, dilation, replicate = ctx.settings
        return _correlate_same(grad, taps, dim, dilation, replicate, adjoint=True), *[None] * 4


def _correlate_same(
    x: torch.Tensor,
    taps: Sequence[float],
    dim: int,
    dilation: int,
    replicate: bool,
    adjoint: bool,
) -> torch.Tensor:
    """:class:`_CorrelateSame`'s forward map, or its adjoint (``adjoint=True``)."""
    n = x.shape[dim]
    left = dilation * (len(taps) - 1) // 2
    offsets = [j * dilation - left for j in range(len(taps))]
    centre = [w for o, w in zip(offsets, taps, strict=True) if o == 0]
    out = x * centre[0] if centre else torch.zeros_like(x)
    for o, w in zip(offsets, taps, strict=True):
        m = n - abs(o)  # outputs that read a voxel inside the axis
        if o != 0 and m > 0:
            src, dst = (max(-o, 0), max(o, 0)) if adjoint else (max(o, 0), max(-o, 0))
            out.narrow(dim, dst, m).add_(x.narrow(dim, src, m), alpha=w)
    if not replicate:
        return out
    # the outputs within the reach of an end read the end voxel, with the summed weight of
    # the taps that reach past it: output i gets sum_{o > n-1-i} w_o x[n-1] (o_j > 0) and
    # sum_{o < -i} w_o x[0] (o_j < 0)
    for sign in (1, -1):
        reach = [(abs(o), w) for o, w in zip(offsets, taps, strict=True) if o * sign > 0]
        if not reach:
            continue
        r = min(max(o for o, _ in reach), n)
        # q: distance of the output from the end voxel (0 at the end)
        weights = [sum(w for o, w in reach if o > q) for q in range(r)]
        shape = [1] * x.ndim
        shape[dim] = r
        cw = torch.tensor(weights[::-1] if sign > 0 else weights, dtype=x.dtype, device=x.device)
        cw = cw.reshape(shape)
        end, near = (n - 1, n - r) if sign > 0 else (0, 0)
        if adjoint:
            out.narrow(dim, end, 1).add_((x.narrow(dim, near, r) * cw).sum(dim, keepdim=True))
        else:
            out.narrow(dim, near, r).add_(x.narrow(dim, end, 1) * cw)
    return out


# a "same"-size correlation along an axis of at most this many voxels, of a tensor of at most
# this many elements, runs as one product with its banded matrix instead of shifted adds: on
# small tensors the per-operation cost of the adds dominates (a Gaussian blur, sigma 1 voxel,
# of a 3-channel field of 31x31x23 voxels: 0.55 -> 0.28 ms, 2 CPU threads; DIO's solver's
# coarsest level 0.46-0.50 -> 0.33-0.41 s a pair), at 61x61x45 voxels already slower
_MATMUL_MAX_AXIS = 256
_MATMUL_MAX_ELEMENTS = 1 << 17


@functools.lru_cache(maxsize=64)
def _banded(
    taps: tuple[float, ...],
    n: int,
    dilation: int,
    replicate: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """The ``(n, n)`` matrix of a "same"-size correlation along an axis of ``n`` voxels
    (:class:`_CorrelateSame`'s map: output ``i`` reads ``x[i + o_j]``, clamped into the axis
    with ``replicate``, dropped outside it otherwise). Shared: read it, never write to it."""
    left = dilation * (len(taps) - 1) // 2
    matrix = np.zeros((n, n))
    rows = np.arange(n)
    for j, w in enumerate(taps):
        cols = rows + j * dilation - left
        keep = slice(None) if replicate else (cols >= 0) & (cols < n)
        np.add.at(matrix, (rows[keep], np.clip(cols, 0, n - 1)[keep]), w)
    return torch.as_tensor(matrix, dtype=dtype, device=device)


def _along_axis(x: torch.Tensor, matrix: torch.Tensor, dim: int) -> torch.Tensor:
    """``matrix @ x`` along tensor dimension ``dim`` (differentiable in ``x``)."""
    n = x.shape[dim]
    pre, post = math.prod(x.shape[:dim]), math.prod(x.shape[dim + 1 :])
    if post == 1:
        out = x.reshape(pre, n) @ matrix.T
    else:
        out = torch.matmul(matrix, x.reshape(pre, n, post))
    return out.reshape(x.shape)


def filter_axis(
    x: torch.Tensor,
    kernel: torch.Tensor | tuple[float, ...],
    axis: int,
    *,
    padding: str = "zeros",
    stride: int = 1,
    dilation: int = 1,
) -> torch.Tensor:
    """Correlate every channel of ``x`` with a 1D ``kernel`` along spatial ``axis`` (0-based).

    ``kernel``: a tensor, or its taps as a tuple of floats (a constant). ``padding``:
    ``"zeros"`` or ``"replicate"`` ("same" output size at stride 1), or ``"valid"``. A
    constant kernel runs as shifted multiply-adds (:class:`_CorrelateSame` for a "same"
    output at stride 1, as a product with its banded matrix on small tensors; else
    :class:`_Correlate` on the padded input); a kernel that needs a gradient goes through a
    depthwise convolution.
    """
    d = x.ndim - 2
    if not 0 <= axis < d:
        raise ValueError(f"axis {axis} out of range for a {d}D input")
    k: torch.Tensor | None = None
    taps: tuple[float, ...] | None = None
    if isinstance(kernel, tuple):
        taps = kernel
    else:
        k = kernel.to(device=x.device, dtype=x.dtype)
        if not k.requires_grad:
            taps = tuple(float(v) for v in k.detach().cpu().tolist())
    size = len(taps) if taps is not None else int(kernel.numel())  # type: ignore[union-attr]
    reach = dilation * (size - 1)
    if padding not in ("zeros", "replicate", "valid"):
        raise ValueError(f"padding must be 'zeros', 'replicate' or 'valid', got {padding!r}")
    if padding == "zeros" and reach % 2:
        raise ValueError("zero 'same' padding needs an odd kernel reach")
    if padding != "valid" and stride == 1 and taps is not None:
        n = x.shape[axis + 2]
        if n <= _MATMUL_MAX_AXIS and x.numel() <= _MATMUL_MAX_ELEMENTS:
            matrix = _banded(taps, n, int(dilation), padding == "replicate", x.dtype, x.device)
            return _along_axis(x, matrix, axis + 2)
        same: torch.Tensor = _CorrelateSame.apply(  # type: ignore[no-untyped-call]
            x, taps, axis + 2, int(dilation), padding == "replicate"
        )
        return same
    if padding != "valid":
        pads = [0, 0] * d
        pads[2 * (d - 1 - axis)] = reach // 2
        pads[2 * (d - 1 - axis) + 1] = reach - reach // 2
        x = F.pad(x, pads, mode="replicate" if padding == "replicate" else "constant")
    if x.shape[axis + 2] <= reach:
        raise ValueError("the kernel reaches beyond the (padded) input")
    if taps is not None:
        out: torch.Tensor = _Correlate.apply(  # type: ignore[no-untyped-call]
            x, taps, axis + 2, int(dilation), int(stride)
        )
        return out
    assert k is not None
    channels = x.shape[1]
    shape = [1] * d
    shape[axis] = k.numel()
    weight = k.reshape(1, 1, *shape).expand(channels, 1, *shape)
    strides = [1] * d
    strides[axis] = stride
    dilations = [1] * d
    dilations[axis] = dilation
    return _CONV[d](x, weight, stride=strides, dilation=dilations, groups=channels)


def separable_filter(
    x: torch.Tensor,
    kernels: Sequence[torch.Tensor | tuple[float, ...]],
    *,
    padding: str = "zeros",
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
) -> torch.Tensor:
    """Apply one 1D kernel per spatial axis in turn (a separable nD filter); each kernel a
    tensor or its taps (see :func:`filter_axis`)."""
    d = x.ndim - 2
    if len(kernels) != d:
        raise ValueError(f"{d}D input needs {d} kernels, got {len(kernels)}")
    strides = [int(s) for s in _per_axis(stride, d, "stride")]
    dilations = [int(s) for s in _per_axis(dilation, d, "dilation")]
    for axis, k in enumerate(kernels):
        x = filter_axis(x, k, axis, padding=padding, stride=strides[axis], dilation=dilations[axis])
    return x


def box_sum(
    x: torch.Tensor,
    window: int | Sequence[int],
    *,
    padding: str = "zeros",
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
) -> torch.Tensor:
    """Sum over a ``window`` (odd, voxels) box around each voxel, by separable passes.

    With ``padding="zeros"`` the output has the input's size and voxels outside count as 0.
    """
    d = x.ndim - 2
    sizes = [int(w) for w in _per_axis(window, d, "window")]
    kernels = [(1.0,) * w for w in sizes]
    return separable_filter(x, kernels, padding=padding, stride=stride, dilation=dilation)


def gaussian_kernel1d(sigma: float, truncate: float = 3.0) -> torch.Tensor:
    """Normalised sampled Gaussian (``sigma`` in voxels), radius ``ceil(truncate * sigma)``."""
    return torch.tensor(_gaussian_taps(float(sigma), float(truncate)), dtype=torch.float64)


@functools.lru_cache(maxsize=64)
def _gaussian_taps(sigma: float, truncate: float) -> tuple[float, ...]:
    """:func:`gaussian_kernel1d`'s taps (float64), computed once per ``sigma`` and
    ``truncate``."""
    if sigma <= 0:
        return (1.0,)
    radius = max(int(math.ceil(truncate * sigma)), 1)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return tuple(float(v) for v in k / k.sum())


def gaussian_blur(
    x: torch.Tensor, sigma: float | Sequence[float], *, padding: str = "replicate"
) -> torch.Tensor:
    """Gaussian smoothing with per-axis ``sigma`` in voxels (0 leaves that axis alone)."""
    d = x.ndim - 2
    sigmas = _per_axis(sigma, d, "sigma")
    out = x
    for axis, s in enumerate(sigmas):
        if s > 0:
            out = filter_axis(out, _gaussian_taps(s, 3.0), axis, padding=padding)
    return out


def multi_gaussian_blur(
    x: torch.Tensor,
    sigmas: Sequence[float],
    weights: Sequence[float],
    *,
    padding: str = "zeros",
) -> torch.Tensor:
    """Smoothing by a multi-Gaussian kernel ``sum_i w_i G_sigma_i`` (``sigmas`` in voxels,
    isotropic; ``weights`` >= 0 summing to one, so the kernel has unit mass). Zero padding by
    default: what lies outside the grid counts as zero (a momentum field's support)."""
    if len(sigmas) != len(weights) or not sigmas:
        raise ValueError("multi-Gaussian: one weight per sigma, at least one")
    if min(weights) < 0 or abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"multi-Gaussian weights must be >= 0 and sum to 1, got {weights}")
    out = torch.zeros_like(x)
    for sigma, weight in zip(sigmas, weights, strict=True):
        if weight > 0:
            out = out + weight * gaussian_blur(x, sigma, padding=padding)
    return out


def central_difference(x: torch.Tensor, axis: int) -> torch.Tensor:
    """``(x[i+1] - x[i-1]) / 2`` along spatial ``axis``; the output loses one voxel at each end
    of that axis (no padding), so it is exact and unbiased wherever it is defined."""
    dim = axis + 2
    n = x.shape[dim]
    return (x.narrow(dim, 2, n - 2) - x.narrow(dim, 0, n - 2)) / 2


def forward_difference(x: torch.Tensor, axis: int) -> torch.Tensor:
    """``x[i+1] - x[i]`` along spatial ``axis`` (one voxel shorter on that axis)."""
    dim = axis + 2
    n = x.shape[dim]
    return x.narrow(dim, 1, n - 1) - x.narrow(dim, 0, n - 1)
