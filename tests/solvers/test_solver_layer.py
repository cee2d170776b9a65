"""The solver as a layer: the optimum's value, implicit gradients into a feature network."""

from __future__ import annotations

import pytest
import torch
from conftest import smooth_image

from unireg.solvers import Stage, solve
from unireg.solvers.layer import dense_objective, register_features
from unireg.spatial.warp import warp


def _stage(iterations: int = 60) -> Stage:
    return Stage("ffd", [(1, iterations)], loss="mse", lr=0.2, smooth_gradient=1.0,
                 smooth_field=1.0, tolerance=0.0)  # fmt: skip


def _pair(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    fixed = torch.cat([smooth_image((24, 28), seed=s).float() for s in range(batch)])
    shift = torch.zeros(batch, 2, 24, 28)
    shift[:, 0] = 0.08  # normalised units: about one voxel
    return fixed, warp(fixed, shift, padding="border")


def test_objective_is_the_similarity_of_the_warped_features() -> None:
    fixed, moving = _pair()
    zero = torch.zeros(2, 2, 24, 28)
    expected = ((fixed - moving) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(dense_objective(fixed, moving, zero), expected)
    # a linear map given as a batch of identity matrices changes nothing
    eye = torch.eye(3).expand(2, 3, 3)
    torch.testing.assert_close(dense_objective(fixed, moving, zero, matrix=eye), expected)


def test_forward_value_is_the_solver_optimum_for_each_batch_element() -> None:
    fixed, moving = _pair()
    out = register_features(fixed, moving, [_stage()])
    assert out.displacement.shape == (2, 2, 24, 28)
    for b in range(2):
        alone = solve(fixed[b : b + 1], moving[b : b + 1], [_stage()])
        torch.testing.assert_close(out.displacement[b : b + 1], alone.displacement)
    before = dense_objective(fixed, moving, torch.zeros_like(out.displacement))
    after = dense_objective(fixed, moving, out.displacement)
    assert (after < 0.5 * before).all()


def test_implicit_gradient_reaches_the_features_and_descends_an_outer_loss() -> None:
    torch.manual_seed(0)
    fixed, moving = _pair(1)
    net = torch.nn.Conv2d(1, 3, 3, padding=1)

    def outer() -> torch.Tensor:
        out = register_features(net(fixed), net(moving), [_stage(40)], step=1.0)
        return (out.displacement**2).mean()  # outer loss: the solver should find no motion

    loss = outer()
    loss.backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    with torch.no_grad():
        for p in net.parameters():
            p -= 0.5 * p.grad / max(float(p.grad.norm()), 1e-12)
    assert float(outer().detach()) < float(loss.detach())


def test_no_graph_without_gradients() -> None:
    fixed, moving = _pair(1)
    out = register_features(fixed, moving, [_stage(5)])
    assert not out.displacement.requires_grad


def test_a_linear_last_stage_is_refused() -> None:
    fixed, moving = _pair(1)
    with pytest.raises(ValueError, match="dense stage last"):
        register_features(fixed, moving, [Stage("affine", [(1, 5)])])
