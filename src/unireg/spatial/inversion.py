"""Inverting a displacement field: the deformation inversion layer of SITReg.

For the map ``x -> x + u(x)`` the inverse ``y -> y + v(y)`` satisfies the fixed-point equation
``v(y) = -u(y + v(y))``. :func:`invert_displacement` solves it with Anderson acceleration
(Type II, a few past iterates) to a tolerance stated in voxels, and its backward pass is
implicit (deep-equilibrium style): the gradient solves ``lambda = g + J_v^T lambda`` at the
solution by fixed-point iteration, then ``dL/du = J_u^T lambda``, where ``J`` are the Jacobians
of ``F(v, u) = -u(x + v)``; only the solution is stored, not the forward iterations.

Convergence needs the map to be invertible (for the plain iteration, ``|grad u| < 1``); when
the tolerance is not reached the layer warns with the iteration count and residual, and
:func:`invert_displacement` with ``return_info=True`` returns them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from unireg.spatial.geometry import Geometry
from unireg.spatial.grid import channels_last, shared_identity_grid, voxel_to_normalized_scale
from unireg.spatial.warp import sample


@dataclass
class InversionInfo:
    """How a solve went: ``iterations``, the final ``residual`` (max over voxels of
    ``|v - F(v)|``, in voxels of the field's grid) and whether it ``converged``."""

    iterations: int
    residual: float
    converged: bool


def _max_norm(r: torch.Tensor, scale: torch.Tensor) -> float:
    """``max_x |r(x)|`` in voxels for a normalised channel-first field, ``scale`` the
    per-channel normalised -> voxel factors (a sum of squares accumulated channel by channel:
    ``norm(dim=1)`` reduces across a strided axis and is ~20x slower on CPU)."""
    weights = scale.reshape(-1).square().tolist()
    acc = r[:, 0].square().mul_(weights[0])
    for c in range(1, r.shape[1]):
        acc.addcmul_(r[:, c], r[:, c], value=weights[c])
    return float(acc.amax().sqrt())


def _apply(u: torch.Tensor, v: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``F(v) = -u(x + v(x))`` for normalised channel-first fields."""
    return -sample(u, grid + channels_last(v), padding="border")


def _anderson(
    u: torch.Tensor, tol: float, max_iter: int, memory: int, beta: float = 1.0
) -> tuple[torch.Tensor, InversionInfo]:
    """Anderson-accelerated fixed-point iteration of ``F`` (no gradient tracking) from the
    first-order guess ``-u``.

    The iterates are kept with their components in reversed (last axis first) order, the
    order ``grid_sample`` takes points in, and ``-u`` is sampled with its channels reversed:
    ``F(v)`` then comes out in that order, with no flip or negation per iteration. The last
    ``memory`` differences of residuals and of the update directions live in ring buffers and
    their Gram matrix is updated one row per iteration, so an iteration costs
    ``O(memory * N)`` besides the evaluation of ``F``."""
    shape = tuple(u.shape[2:])
    b = u.shape[0]
    grid = shared_identity_grid(shape, device=u.device, dtype=u.dtype).flip(-1)
    scale = (1.0 / voxel_to_normalized_scale(shape, u)).flip(1)
    neg_u = -u.flip(1)
    v = neg_u.clone()
    m = max(int(memory), 0)
    n = v[0].numel()
    # x_{k+1} = x_k + beta r_k - G gamma, G the differences of x + beta r, and gamma
    # minimising |r_k - dF gamma|, dF the differences of the residuals
    # (empty when m is 0: the plain iteration never reads them)
    dg = u.new_empty(b, m, n)
    df = u.new_empty(b, m, n)
    gram = u.new_zeros(b, m, m)
    prev_g: torch.Tensor | None = None
    prev_r: torch.Tensor | None = None
    total = 0  # differences written so far; the newest sits at slot (total - 1) % m
    residual = float("inf")
    for it in range(1, max_iter + 1):
        fv = sample(neg_u, grid + channels_last(v), padding="border", reversed_axes=True)
        r = fv - v
        residual = _max_norm(r, scale)
        if residual < tol:
            return fv.flip(1), InversionInfo(it, residual, True)
        r_flat = r.reshape(b, n)
        g_flat = torch.add(v.reshape(b, n), r_flat, alpha=beta)  # the plain step x + beta r
        if m == 0 or prev_g is None:
            prev_g, prev_r = g_flat, r_flat
            v = g_flat.reshape(v.shape)
            continue
        assert prev_r is not None
        slot = total % m
        torch.sub(g_flat, prev_g, out=dg[:, slot])
        torch.sub(r_flat, prev_r, out=df[:, slot])
        total += 1
        stored = min(total, m)
        # (B, 1, N) @ (B, N, m): ~10x faster on CPU than (B, m, N) @ (B, N, 1)
        held = df[:, :stored].transpose(1, 2)
        row = torch.bmm(df[:, slot].unsqueeze(1), held).squeeze(1)  # (B, stored)
        gram[:, slot, :stored] = row
        gram[:, :stored, slot] = row
        prev_g, prev_r = g_flat, r_flat
        # minimise |r - dF gamma| (the constrained Anderson problem through differences)
        gm = gram[:, :stored, :stored]
        reg = 1e-10 * (gm.diagonal(dim1=1, dim2=2).mean(-1) + 1e-30)
        gm = gm + reg[:, None, None] * torch.eye(stored, dtype=u.dtype, device=u.device)
        rhs = torch.bmm(r_flat.unsqueeze(1), held).transpose(1, 2)  # (B, stored, 1)
        gamma = torch.linalg.solve(gm, rhs).transpose(1, 2)  # (B, 1, stored)
        v = torch.baddbmm(g_flat.unsqueeze(1), gamma, dg[:, :stored], alpha=-1).reshape(v.shape)
    fv = sample(neg_u, grid + channels_last(v), padding="border", reversed_axes=True)
    residual = _max_norm(fv - v, scale)
    return fv.flip(1), InversionInfo(max_iter, residual, residual < tol)


class _InvertDisplacement(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        u: torch.Tensor,
        tol: float,
        max_iter: int,
        memory: int,
        info_box: list[InversionInfo],
    ) -> torch.Tensor:
        with torch.no_grad():
            v, info = _anderson(u.detach(), tol, max_iter, memory)
        info_box.append(info)
        ctx.save_for_backward(u, v)
        ctx.settings = (tol, max_iter)
        return v

    @staticmethod
    def backward(ctx: Any, grad_v: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        u, v = ctx.saved_tensors
        tol, max_iter = ctx.settings
        shape = tuple(u.shape[2:])
        grid = shared_identity_grid(shape, device=u.device, dtype=u.dtype)
        scale = 1.0 / voxel_to_normalized_scale(shape, u)
        with torch.enable_grad():
            u_ = u.detach().requires_grad_(True)
            v_ = v.detach().requires_grad_(True)
            f = _apply(u_, v_, grid)
            lam = grad_v
            norm = _max_norm(grad_v, scale) + 1e-30
            for _ in range(max_iter):  # lambda = g + J_v^T lambda
                (jt,) = torch.autograd.grad(f, v_, lam, retain_graph=True)
                new = grad_v + jt
                change = _max_norm(new - lam, scale)
                lam = new
                if change < tol * norm:
                    break
            else:
                warnings.warn(
                    f"deformation inversion backward did not converge in {max_iter} "
                    f"iterations (relative change {change / norm:.2e})",
                    RuntimeWarning,
                    stacklevel=2,
                )
            (grad_u,) = torch.autograd.grad(f, u_, lam)
        return grad_u, None, None, None, None


def invert_displacement(
    displacement: torch.Tensor,
    *,
    tol: float = 1e-3,
    max_iter: int = 50,
    memory: int = 4,
    return_info: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, InversionInfo]:
    """The inverse of ``x -> x + u(x)`` as a displacement on the same grid.

    Args:
        displacement: ``u``, normalised units, channel first ``(B, d, *shape)``.
        tol: stop when ``max |v - F(v)|`` is below this many voxels (forward), or when the
            backward iterate changes by less than ``tol`` relative to the incoming gradient.
        max_iter: iteration cap of both passes.
        memory: Anderson acceleration depth (past iterates used).
        return_info: also return :class:`InversionInfo` of the forward solve.

    Differentiable (implicit backward); warns when a pass does not converge.
    """
    if displacement.ndim not in (4, 5) or displacement.shape[1] != displacement.ndim - 2:
        raise ValueError(f"expected a (B, d, *shape) displacement, got {tuple(displacement.shape)}")
    box: list[InversionInfo] = []
    v: torch.Tensor = _InvertDisplacement.apply(  # type: ignore[no-untyped-call]
        displacement, float(tol), int(max_iter), int(memory), box
    )
    info = box[0]
    if not info.converged:
        warnings.warn(
            f"deformation inversion did not converge: {info.iterations} iterations, residual "
            f"{info.residual:.2e} voxels (tolerance {tol:g})",
            RuntimeWarning,
            stacklevel=2,
        )
    return (v, info) if return_info else v


def invert_covering(
    displacement: torch.Tensor, geometry: Geometry, *, max_pad: int = 8, **kwargs: Any
) -> tuple[torch.Tensor, Geometry]:
    """The inverse of ``x -> x + u(x)`` on ``geometry``'s grid extended by as many voxels per
    face as the field moves the faces (at most ``max_pad``), so the inverse also covers the
    points the map takes beyond the grid (where a field on the grid itself would read zero).

    ``u`` (normalised units of ``geometry``'s grid, ``(1, d, *shape)``) is continued beyond the
    grid by its face values for the inversion (:func:`invert_displacement`, ``kwargs`` passed
    on). Returns the inverse (normalised units of the extended grid) and that grid's
    geometry."""
    d = displacement.ndim - 2
    shape = tuple(displacement.shape[2:])
    voxels = displacement / voxel_to_normalized_scale(shape, displacement)
    reach = 0.0
    for axis in range(d):
        for index in (0, shape[axis] - 1):
            face = voxels.narrow(2 + axis, index, 1)
            reach = max(reach, float(torch.linalg.vector_norm(face, dim=1).max()))
    pad = min(int(math.ceil(reach)) + 1, int(max_pad))
    padded = torch.nn.functional.pad(voxels, [pad, pad] * d, mode="replicate")
    grid = geometry.extended([pad] * d, [pad] * d)
    inverse = invert_displacement(padded * voxel_to_normalized_scale(grid.shape, padded), **kwargs)
    assert isinstance(inverse, torch.Tensor)
    return inverse, grid
