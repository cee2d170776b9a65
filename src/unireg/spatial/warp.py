"""Sampling and warping: the one place where ``torch.nn.functional.grid_sample`` is called.

Pull-back convention: the output at fixed voxel ``x`` is the moving image at ``T(x)``. Points are
normalised coordinates of the *moving* grid in tensor-axis order; ``grid_sample`` wants them in
reversed (x = last axis) order, and that flip happens in :func:`sample` only (or the points
are built in that order: :func:`warp` does, and says so with ``reversed_axes``).

Border handling (``padding``): ``"zeros"`` (outside the moving field of view is 0; the default
for images), ``"border"`` (nearest edge value; the default for displacement fields, so a field
is extended constantly outside its grid) or ``"reflection"``. With ``"zeros"``, a point less
than one voxel outside the grid blends the edge voxel with the zero padding (PyTorch's
convention, continuous at the edge); ITK/ANTs return 0 for any point outside, so the two agree
everywhere but in that one-voxel rim of the field of view.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from unireg.spatial.grid import affine_grid, axis_coordinates, displacement_to_points

Mode = Literal["linear", "nearest"]
Padding = Literal["zeros", "border", "reflection"]

_MODES = {"linear": "bilinear", "nearest": "nearest"}


def sample(
    image: torch.Tensor,
    points: torch.Tensor,
    *,
    mode: Mode = "linear",
    padding: Padding = "zeros",
    reversed_axes: bool = False,
) -> torch.Tensor:
    """Sample ``image`` at normalised points.

    Args:
        image: ``(B, C, *moving_spatial)``, 2D or 3D.
        points: ``(B, *out_spatial, d)`` normalised coordinates of the moving grid, tensor-axis
            order. Either batch size may be 1 and is broadcast.
        mode: ``"linear"`` ((bi/tri)linear) or ``"nearest"``.
        padding: value outside the moving grid, see module docstring.
        reversed_axes: ``points`` are already in reversed (last axis first) order, as
            ``grid_sample`` takes them: for loops that keep their iterates in that order.

    Returns:
        ``(B, C, *out_spatial)``, differentiable in both ``image`` and ``points`` (linear mode).
    """
    d = points.shape[-1]
    if image.ndim != d + 2:
        raise ValueError(f"image of shape {tuple(image.shape)} does not match {d}D points")
    if mode not in _MODES:
        raise ValueError(f"mode must be 'linear' or 'nearest', got {mode!r}")
    batch = max(image.shape[0], points.shape[0])
    image = image.expand(batch, *image.shape[1:])
    points = points.expand(batch, *points.shape[1:])
    if points.dtype != image.dtype:
        points = points.to(image.dtype)
    out_spatial = points.shape[1:-1]
    channels = image.shape[1]
    count = points[0, ..., 0].numel()
    parts = _parts(batch, count) if image.device.type == "cpu" else 1
    if parts > 1:
        # PyTorch's CPU samplers run one thread per batch element: one image's points are
        # split into equal parts (the last padded with points at the centre) sampled as a
        # batch of the (expanded, not copied) image
        flat = points.reshape(count, d)
        per = -(-count // parts)
        if per * parts > count:
            flat = torch.cat([flat, flat.new_zeros(per * parts - count, d)])
        out = _sample(
            image.expand(parts, *image.shape[1:]), flat.reshape(parts, per, d), mode, padding,
            reversed_axes,
        )  # fmt: skip
        out = out.transpose(0, 1).reshape(channels, per * parts)[:, :count]
        return out.reshape(1, channels, *out_spatial)
    out = _sample(image, points.reshape(batch, -1, d), mode, padding, reversed_axes)
    return out.reshape(batch, channels, *out_spatial)


# points per part below which a single image's sampling is not split across threads
_SPLIT_MIN_POINTS = 16384


# elements from which the per-coordinate reversal beats ``flip`` (2 CPU threads: even at
# about 1e5, 1.3x faster at 4e6; below, ``flip``'s single call costs less than its copies)
_REVERSE_MIN_ELEMENTS = 131072


class _Reverse(torch.autograd.Function):
    """The last axis's entries in reverse order (``x.flip(-1)``), written one entry at a time:
    for the few coordinates of many points faster on CPUs than ``flip``, whose generic kernel
    indexes every element; its own adjoint."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return _reverse_last(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return _reverse_last(grad)


def _reverse_last(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n = x.shape[-1]
    for i in range(n):
        out[..., i] = x[..., n - 1 - i]
    return out


def _reversed(points: torch.Tensor) -> torch.Tensor:
    """``points.flip(-1)``, by :class:`_Reverse` for large point sets."""
    if points.numel() < _REVERSE_MIN_ELEMENTS:
        return points.flip(-1)
    out: torch.Tensor = _Reverse.apply(points)  # type: ignore[no-untyped-call]
    return out


def _parts(batch: int, points: int) -> int:
    """Into how many parts one image's ``points`` are split (1: not split): one per thread,
    each of at least :data:`_SPLIT_MIN_POINTS`."""
    threads = torch.get_num_threads()
    if batch != 1 or threads < 2:
        return 1
    return max(1, min(threads, points // _SPLIT_MIN_POINTS))


def _sample(
    image: torch.Tensor, points: torch.Tensor, mode: str, padding: str, reversed_axes: bool
) -> torch.Tensor:
    """:func:`sample` of ``(B, N, d)`` points: ``(B, C, N)``."""
    d = points.shape[-1]
    if _folds(image, points, mode, padding):
        return _sample_3d_folded(image, points, padding, reversed_axes)
    grid = points.reshape(points.shape[0], *[1] * (d - 1), points.shape[1], d)
    out = F.grid_sample(
        image,
        grid if reversed_axes else _reversed(grid),
        mode=_MODES[mode],
        padding_mode=padding,
        align_corners=True,
    )
    return out.reshape(out.shape[0], out.shape[1], -1)


# rows of the folded image (depth x height) up to which its float32 row coordinate carries
# the position to ~2.5e-4 voxel (2^-24 relative, times the rows); larger volumes (such as
# whole images, whose values are written out) take the 3D sampler
_FOLD_MAX_ROWS = 4096


def _folds(image: torch.Tensor, points: torch.Tensor, mode: str, padding: str) -> bool:
    """Whether :func:`_sample_3d_folded` serves this call: 3D linear sampling on the CPU with
    zero or border padding, without gradients, of a volume of at least 2 voxels per axis and at
    most :data:`_FOLD_MAX_ROWS` rows once folded."""
    if image.ndim != 5 or mode != "linear" or padding not in ("zeros", "border"):
        return False
    if image.device.type != "cpu":  # GPU 3D samplers are parallel already
        return False
    if torch.is_grad_enabled() and (image.requires_grad or points.requires_grad):
        return False
    depth, height, width = image.shape[2:]
    return min(depth, height, width) >= 2 and depth * height <= _FOLD_MAX_ROWS


def _sample_3d_folded(
    image: torch.Tensor, points: torch.Tensor, padding: str, reversed_axes: bool
) -> torch.Tensor:
    """Trilinear sampling as bilinear sampling: the volume's depth slices are stacked as the
    rows of one 2D image, each point is sampled bilinearly in the two slices around it (one
    2D ``grid_sample`` call for both) and the two are blended along depth. PyTorch's CPU 2D
    sampler is vectorised and its 3D one is not: about half the time for the same values (to
    float rounding: the row coordinate also carries the slice, see :data:`_FOLD_MAX_ROWS`).

    Points are clamped into the grid (so no bilinear step blends two slices): that is the
    ``"border"`` padding; ``"zeros"`` is the same times ``prod_a max(0, 1 - e_a)``, ``e_a``
    how far (voxels) the point lies beyond the grid along axis ``a``, which is what linear
    interpolation against zero padding gives. ``points``: ``(B, N, 3)``."""
    batch, channels, depth, height, width = image.shape
    zc, yc, xc = (2, 1, 0) if reversed_axes else (0, 1, 2)
    pz, py, px = points[..., zc], points[..., yc], points[..., xc]
    inside = None
    if padding == "zeros":
        for p, n in ((pz, depth), (py, height), (px, width)):
            # 1 - (voxels beyond the grid), at least 0
            f = p.abs().sub_(1).clamp_(min=0).mul_(-0.5 * (n - 1)).add_(1).clamp_(min=0)
            inside = f if inside is None else inside.mul_(f)
    z = pz.clamp(-1, 1).add_(1).mul_(0.5 * (depth - 1))  # voxels
    z0 = z.floor().clamp_(max=depth - 2)
    frac = z.sub_(z0)
    # normalised row of the point in slice z0: (z0 * height + y) * step - 1, y in voxels
    step = 2.0 / (depth * height - 1)
    half = 0.5 * (height - 1) * step
    row = py.clamp(-1, 1).mul_(half).add_(half - 1).add_(z0, alpha=height * step)
    grid = points.new_empty(batch, 2, points.shape[1], 2)
    grid[..., 0] = px.unsqueeze(1)  # the 2D sampler's border padding clamps the columns
    grid[:, 0, :, 1] = row
    torch.add(row, height * step, out=grid[:, 1, :, 1])
    flat = image.reshape(batch, channels, depth * height, width)
    both = F.grid_sample(flat, grid, mode="bilinear", padding_mode="border", align_corners=True)
    out = torch.lerp(both[:, :, 0], both[:, :, 1], frac.unsqueeze(1))
    return out if inside is None else out.mul_(inside.unsqueeze(1))


def warp(
    image: torch.Tensor,
    displacement: torch.Tensor,
    *,
    mode: Mode = "linear",
    padding: Padding = "zeros",
) -> torch.Tensor:
    """Warp a moving image by a normalised displacement field on the fixed grid.

    ``displacement`` is ``(B, d, *fixed_spatial)``; the moving image is sampled at
    ``x + displacement(x)``.
    """
    points = displacement_to_points(displacement, reversed_axes=True)
    return sample(image, points, mode=mode, padding=padding, reversed_axes=True)


def warp_affine(
    image: torch.Tensor,
    matrix: torch.Tensor,
    shape: tuple[int, ...] | None = None,
    *,
    mode: Mode = "linear",
    padding: Padding = "zeros",
) -> torch.Tensor:
    """Warp a moving image by a normalised-frame affine onto a fixed grid of ``shape``.

    ``matrix`` is ``(B, d+1, d+1)`` (or unbatched), fixed normalised -> moving normalised.
    ``shape`` defaults to the moving image's own spatial shape.

    When the map is axis-aligned (each fixed axis moves along one moving axis only: a change of
    grid between images whose axes agree up to order and sign, a scaling, a shift), linear
    interpolation is separable and runs as one 1D interpolation per axis: the same values as
    ``grid_sample`` (to float rounding, voxel positions computed in float64) for a fraction of
    the work. A matrix that requires a gradient always takes the ``grid_sample`` path.
    """
    shape = tuple(image.shape[2:]) if shape is None else tuple(shape)
    if mode == "linear" and padding in ("zeros", "border") and not matrix.requires_grad:
        perm = _axis_permutation(matrix, len(shape))
        if perm is not None:
            return _separable_linear(image, matrix.reshape(matrix.shape[-2:]), shape, perm, padding)
    return sample(image, affine_grid(matrix.to(image.dtype), shape), mode=mode, padding=padding)


def _axis_permutation(matrix: torch.Tensor, d: int) -> list[int] | None:
    """For an unbatched (or batch-1) axis-aligned map, the moving axis each fixed axis moves
    along; else None."""
    if matrix.ndim == 3 and matrix.shape[0] != 1:
        return None
    lin = matrix.reshape(matrix.shape[-2:])[:d, :d].abs()
    nonzero = lin > 1e-12 * float(lin.max())
    if (nonzero.sum(0) != 1).any() or (nonzero.sum(1) != 1).any():
        return None
    return [int(nonzero[:, k].nonzero()) for k in range(d)]


def _separable_linear(
    image: torch.Tensor,
    matrix: torch.Tensor,
    shape: tuple[int, ...],
    perm: list[int],
    padding: Padding,
) -> torch.Tensor:
    """Linear resampling by an axis-aligned normalised map (see :func:`warp_affine`); the
    moving axis ``perm[k]`` is read along fixed axis ``k``."""
    d = len(shape)
    m = matrix.to(torch.float64)
    out = image.permute(0, 1, *[2 + a for a in perm])
    for k, a in enumerate(perm):
        n = image.shape[2 + a]
        x = axis_coordinates(shape[k], device=image.device, dtype=torch.float64)
        pos = (m[a, k] * x + m[a, d] + 1) * 0.5 * (n - 1)  # moving voxels along axis a
        if padding == "border":
            pos = pos.clamp(0, n - 1)
        lo = pos.floor()
        frac = pos - lo
        # the 1D interpolation as a (shape[k], n) matrix, applied by one matmul (a gather
        # along an inner axis is several times slower on CPU)
        weights = torch.zeros(shape[k], n, dtype=torch.float64, device=image.device)
        for idx, weight in ((lo, 1 - frac), (lo + 1, frac)):
            inside = (idx >= 0) & (idx <= n - 1)  # zeros padding: outside contributes 0
            weights.scatter_add_(1, idx.clamp(0, n - 1).long()[:, None], (weight * inside)[:, None])
        # one matrix product over every line along the axis
        lines = torch.movedim(out, 2 + k, -1).contiguous()
        moved = (lines.reshape(-1, n) @ weights.to(image.dtype).T).reshape(*lines.shape[:-1], -1)
        out = torch.movedim(moved, -1, 2 + k)
    return out.contiguous()


def warp_labels(
    labels: torch.Tensor,
    points: torch.Tensor,
    *,
    method: Literal["nearest", "onehot"] = "nearest",
    background: int = 0,
    chunk: int = 8,
) -> torch.Tensor:
    """Warp an integer label map so that the result holds only existing label values.

    Args:
        labels: ``(B, 1, *moving_spatial)`` integer tensor.
        points: ``(B, *out_spatial, d)`` normalised moving coordinates (pull-back).
        method: ``"nearest"`` (nearest-neighbour) or ``"onehot"`` (each label's indicator is
            sampled linearly and the label with the largest value wins; smoother boundaries).
        background: label given to points outside the moving field of view.
        chunk: labels sampled per ``grid_sample`` call in ``"onehot"`` mode (bounds memory to
            ``chunk`` float volumes).

    Returns:
        ``(B, 1, *out_spatial)`` with the dtype of ``labels``. Not differentiable.
    """
    if labels.is_floating_point():
        raise TypeError("warp_labels expects an integer label tensor; cast it first")
    if labels.shape[1] != 1:
        raise ValueError(f"label maps have one channel, got shape {tuple(labels.shape)}")
    with torch.no_grad():
        if method == "nearest":
            # Shift by the background so that grid_sample's zero padding is the background label.
            shifted = labels - background
            big = shifted.numel() > 0 and int(shifted.abs().max()) >= 2**24
            as_float = shifted.to(torch.float64 if big else torch.float32)
            out = sample(as_float, points.to(as_float.dtype), mode="nearest", padding="zeros")
            out = out.round().to(labels.dtype) + background
            return out
        if method != "onehot":
            raise ValueError(f"method must be 'nearest' or 'onehot', got {method!r}")
        values = torch.unique(labels)
        batch = max(labels.shape[0], points.shape[0])
        out_shape = (batch, 1, *points.shape[1:-1])
        best = torch.zeros(out_shape, device=labels.device)
        result = torch.full(out_shape, background, dtype=labels.dtype, device=labels.device)
        for start in range(0, len(values), chunk):
            vals = values[start : start + chunk]
            masks = (labels == vals.view(1, -1, *([1] * (labels.ndim - 2)))).float()
            prob = sample(masks, points.float(), mode="linear", padding="zeros")
            top, idx = prob.max(dim=1, keepdim=True)
            better = top > best
            best = torch.where(better, top, best)
            result = torch.where(better, vals[idx], result)
        return result
