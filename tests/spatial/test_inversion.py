"""The deformation inversion layer (SITReg): accuracy, implicit gradients, non-convergence."""

from __future__ import annotations

import pytest
import torch
from conftest import smooth_field, voxel_lengths

from unireg.spatial import compose_displacements
from unireg.spatial.inversion import invert_displacement


@pytest.mark.parametrize("shape", [(48, 44), (28, 26, 24)])
def test_inverse_of_a_random_smooth_field_composes_to_identity(shape):
    # a smooth field of up to ~3 voxels whose Jacobian stays positive (invertible)
    u = smooth_field(shape, amplitude=0.12 if len(shape) == 2 else 0.2, seed=3)
    assert float(voxel_lengths(u).max()) > 2.0
    v, info = invert_displacement(u, tol=1e-4, return_info=True)
    assert info.converged and info.residual < 1e-4 and info.iterations < 50
    inner = tuple(slice(4, n - 4) for n in shape)  # away from the border clamp
    # the forward map after the inverse is the fixed-point equation itself: within tolerance
    # (measured 1e-7 mean, 3e-6 max voxel)
    exact = voxel_lengths(compose_displacements(u, v))[(slice(None), *inner)]
    assert float(exact.max()) < 1e-4
    # the inverse after the forward map also interpolates v between grid points (linear):
    # measured 0.003 / 0.05 voxel (2D) and 0.010 / 0.13 voxel (3D), mean / max
    other = voxel_lengths(compose_displacements(v, u))[(slice(None), *inner)]
    assert float(other.mean()) < 0.02 and float(other.max()) < 0.2


def test_anderson_needs_fewer_iterations_than_plain_fixed_point():
    u = smooth_field((40, 40), amplitude=0.15, seed=5)
    _, fast = invert_displacement(u, tol=1e-5, return_info=True)
    _, slow = invert_displacement(u, tol=1e-5, memory=0, max_iter=200, return_info=True)
    assert fast.converged and slow.converged
    assert fast.iterations < slow.iterations


def test_implicit_gradient_matches_finite_differences():
    u = (0.08 * smooth_field((7, 6), amplitude=1.0, seed=2)).requires_grad_(True)
    w = torch.randn(1, 2, 7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def f(x):
        return (invert_displacement(x, tol=1e-12, max_iter=200) * w).sum()

    assert torch.autograd.gradcheck(f, (u,), atol=1e-6, rtol=1e-4)


def test_non_convergence_is_reported_with_iterations_and_residual():
    u = smooth_field((32, 32), amplitude=1.5, seed=1)  # folds: no inverse exists
    with pytest.warns(RuntimeWarning, match=r"did not converge: \d+ iterations, residual"):
        _, info = invert_displacement(u, max_iter=10, return_info=True)
    assert not info.converged and info.iterations == 10 and info.residual > 1e-3


@pytest.mark.parametrize("ndim", [2, 3])
def test_bspline_fields_at_the_invertibility_bound_never_fold(ndim):
    from unireg.spatial.bspline import bspline_field, invertibility_bound
    from unireg.spatial.field import jacobian_determinant

    # the appendix construction at integer spacings (phases the grid has): 3D spacing 2 gives
    # 0.72 voxel; non-integer spacings (dense phases) are continuous with it
    assert invertibility_bound(3, 2.0) == pytest.approx(0.72, abs=1e-9)
    assert invertibility_bound(3, 2.02) == pytest.approx(0.72, abs=0.01)
    assert invertibility_bound(3, (2.0, 2.0, 2.0)) == invertibility_bound(3, 2.0)
    g = torch.Generator().manual_seed(ndim)
    ctrl = (12,) * ndim
    out = tuple(3 * (m - 3) + 1 for m in ctrl)  # control spacing 3 output voxels
    bound = invertibility_bound(ndim, 3.0)
    scale = torch.tensor([2 / (n - 1) for n in out], dtype=torch.float64)
    scale = scale.view(1, -1, *[1] * ndim)
    worst_det, worst_rows = float("inf"), 0.0
    for _ in range(20):  # random sign patterns and magnitudes, right at the bound
        c = bound * torch.sign(torch.randn(4, ndim, *ctrl, generator=g, dtype=torch.float64))
        c = c * torch.rand(4, 1, *ctrl, generator=g, dtype=torch.float64).sqrt()
        c[0] = bound * torch.sign(torch.randn(ndim, *ctrl, generator=g, dtype=torch.float64))
        u = bspline_field(c, out)  # output voxels
        worst_det = min(worst_det, float(jacobian_determinant(u * scale).min()))
        # the defining property: forward-difference rows sum to at most 1 (a contraction)
        common = (..., *[slice(0, n - 1) for n in out])
        rows = sum(u.diff(dim=2 + i)[common].abs() for i in range(ndim))
        worst_rows = max(worst_rows, float(rows.max()))
    assert worst_det > 0 and worst_rows <= 1.0 + 1e-9
    # tight within a factor 2: control points stepping from +K b to -K b along the axes
    # (one component along one axis, or every component along all axes) fold at K = 2,
    # never at K = 1 (measured: the all-axes pattern first folds near K = 1.3 in 3D)
    idx = torch.stack(torch.meshgrid(*[torch.arange(m) for m in ctrl], indexing="ij"))
    steps = torch.where(idx >= ctrl[0] // 2, -1.0, 1.0).double()
    for k, folds in ((1.0, False), (2.0, True)):
        one = torch.zeros(1, ndim, *ctrl, dtype=torch.float64)
        one[0, 0] = k * bound * steps[0]
        every = (k * bound * steps.sum(0).sign()).expand(1, ndim, *ctrl)
        for c in (one, every):
            det = float(jacobian_determinant(bspline_field(c, out) * scale).min())
            assert (det <= 0) == folds


def test_the_covering_inverse_is_consistent_up_to_the_faces_the_map_moves_outward():
    # a 3 mm-per-face expansion about the centre plus a smooth wobble (spacing 2 mm): the
    # faces' points land up to ~2 voxels beyond the grid, where an inverse held on the grid
    # reads zero; on the grid extended to cover them it stays consistent everywhere
    import numpy as np

    from unireg.metrics import consistency_error
    from unireg.spatial.field import displacement_to_world
    from unireg.spatial.geometry import Geometry
    from unireg.spatial.grid import identity_grid
    from unireg.spatial.inversion import invert_covering
    from unireg.spatial.transform import DisplacementFieldTransform

    shape = (30, 28, 26)
    geom = Geometry(shape, np.diag([2.0, 2.0, 2.0, 1.0]))
    grow = identity_grid(shape).movedim(-1, 1) * 0.08  # normalised: faces out by ~1-1.2 voxels
    u = grow + smooth_field(shape, amplitude=0.05, seed=1)

    def transform(field, grid):
        return DisplacementFieldTransform(
            displacement_to_world(field.double(), grid, grid)[0], grid
        )

    forward = transform(u, geom)
    plain = transform(invert_displacement(u, tol=1e-4), geom)
    covering, grid = invert_covering(u, geom, tol=1e-4)
    assert grid.shape > shape and np.allclose(grid.center_world, geom.center_world)
    on_grid = consistency_error([forward, plain], geom)
    covered = consistency_error([forward, transform(covering, grid)], geom)
    assert on_grid["max_mm"] > 1.0  # the faces' points read a zero inverse
    assert covered["max_mm"] < 0.2 and covered["mean_mm"] < 0.02, covered
