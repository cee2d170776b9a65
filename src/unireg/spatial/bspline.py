"""Cubic B-spline control grids: dense fields from control points, at any resolution.

A control grid of ``m`` points per axis spans the image's extent in normalised coordinates
(``align_corners=True``: -1 and 1 are the first and last voxel centres) with one extra control
point beyond each end, so control point ``k`` sits at ``-1 + (k - 1) * 2 / (m - 3)``. The field
at a point is ``sum_k c_k B3((x - x_k) / h)`` per axis (tensor product), with ``B3`` the
uniform cubic B-spline and ``h`` the control spacing. Because positions are normalised, the same
control grid gives the field at any output resolution, exactly.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import torch


def cubic_bspline(t: torch.Tensor) -> torch.Tensor:
    """The uniform cubic B-spline kernel ``B3(t)`` (support ``|t| < 2``, ``B3(0) = 2/3``)."""
    a = t.abs()
    inner = 2.0 / 3.0 - a**2 + 0.5 * a**3
    outer = (2.0 - a) ** 3 / 6.0
    return torch.where(a < 1, inner, torch.where(a < 2, outer, torch.zeros_like(a)))


def control_grid_shape(shape: Sequence[int], spacing: float | Sequence[float]) -> tuple[int, ...]:
    """Control points per axis for an image of ``shape`` voxels and a control spacing of at most
    ``spacing`` voxels: ``ceil((n - 1) / spacing) + 3`` (at least 4)."""
    d = len(shape)
    sp = [float(spacing)] * d if isinstance(spacing, int | float) else [float(s) for s in spacing]
    if any(s <= 0 for s in sp):
        raise ValueError(f"control spacing must be positive, got {sp}")
    return tuple(max(math.ceil((n - 1) / s), 1) + 3 for n, s in zip(shape, sp, strict=True))


def bspline_matrix(
    n_out: int,
    n_control: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Basis weights ``(n_out, n_control)``: row ``i`` weighs the control points at output
    voxel ``i`` of an axis of ``n_out`` voxels over the same extent."""
    if n_control < 4:
        raise ValueError("a cubic B-spline axis needs at least 4 control points")
    x = torch.linspace(0.0, 1.0, n_out, dtype=torch.float64) if n_out > 1 else torch.zeros(1)
    t = x.double() * (n_control - 3) + 1.0  # position in control-point units
    k = torch.arange(n_control, dtype=torch.float64)
    return cubic_bspline(t[:, None] - k[None, :]).to(device=device, dtype=dtype)


def bspline_field(control: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Dense field ``(B, C, *shape)`` of control points ``(B, C, *control_shape)``.

    Separable: one small matrix product per axis. Differentiable in ``control``; linear, so the
    field's values are bounded by the control points' (the weights are a partition of unity).
    """
    d = control.ndim - 2
    if d not in (2, 3) or len(shape) != d:
        raise ValueError(f"control grid {tuple(control.shape)} does not match shape {shape}")
    out = control
    for axis, n in enumerate(shape):
        w = bspline_matrix(n, out.shape[2 + axis], device=out.device, dtype=out.dtype)
        out = torch.movedim(torch.movedim(out, 2 + axis, -1) @ w.T, -1, 2 + axis)
    return out


@functools.lru_cache(maxsize=64)
def _difference_weight_bound(spacing: tuple[float, ...], phases: int) -> float:
    """``max_{x, s} sum_k |sum_i s_i D_i(x - k)|``: ``D_i`` the forward difference of one output
    voxel along axis ``i`` of the tensor-product spline (the other axes at the same point),
    ``s`` signs per axis, ``x`` the sampling phase within a control cell."""
    d = len(spacing)
    k = torch.arange(-2, 4, dtype=torch.float64)  # every control point within reach of [0, 1)
    per_axis = []
    for h in spacing:
        if abs(h - round(h)) < 1e-9:  # integer upsampling: the phases the grid really has
            x = torch.arange(round(h), dtype=torch.float64) / round(h)
        else:
            x = torch.linspace(0.0, 1.0, phases + 1, dtype=torch.float64)[:-1]
        t = x[:, None] - k[None, :]  # (phases, controls)
        per_axis.append((cubic_bspline(t), cubic_bspline(t + 1.0 / h) - cubic_bspline(t)))
    # the d terms ``D_i (x) B_j (x) ...`` (phases..., controls...), built once; a sign pattern
    # adds them with +-1 weights (exact), in order
    perm = [2 * a for a in range(d)] + [2 * a + 1 for a in range(d)]
    terms = []
    for i in range(d):
        factors = [per_axis[j][1] if j == i else per_axis[j][0] for j in range(d)]
        term = factors[0]
        for w in factors[1:]:
            term = term[..., None, None] * w
        # term: (p0, k0, p1, k1, ...) -> (phases..., controls...)
        terms.append(term.permute(*perm).contiguous())
    worst = 0.0
    for signs in itertools.product((1.0, -1.0), repeat=d - 1):  # an overall flip changes nothing
        total = terms[0].clone()
        for sign, term in zip(signs, terms[1:], strict=True):
            total.add_(term, alpha=sign)
        sums = total.abs_().flatten(d).sum(-1)
        worst = max(worst, float(sums.max()))
    return worst


def invertibility_bound(ndim: int, spacing: float | Sequence[float], *, phases: int = 24) -> float:
    """Largest control-point value (per component, in output voxels) for which a cubic
    B-spline field ``u`` with control ``spacing`` (output voxels per control spacing, per axis
    or one for all) is invertible when sampled on the output grid, whatever the signs and
    magnitudes of the control points below it: the construction of the SITReg paper's appendix.

    With ``|c| <= b`` every row of the forward-difference Jacobian of the sampled field has
    ``sum_i |D_i u_j| <= b * W``, ``W`` the worst total difference weight over the sampling
    phases and sign patterns (:func:`_difference_weight_bound`; at integer spacings the phases
    the grid has, otherwise ``phases`` per axis). ``b = 1 / W`` makes ``u`` a contraction in
    the max norm on the grid, so the fixed-point inversion converges and ``I + grad u`` is
    diagonally dominant (positive determinant). 3D, spacing 2: 0.72 voxel.
    """
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    if isinstance(spacing, int | float):
        spacing = [spacing] * ndim
    sp = [float(x) for x in spacing]
    if len(sp) != ndim or min(sp) <= 0:
        raise ValueError(f"spacing must be {ndim} positive values, got {spacing}")
    return 1.0 / _difference_weight_bound(tuple(round(x, 9) for x in sp), int(phases))
