"""The solvers' optimisers: Adam and SGD with momentum, in a few lines of tensor arithmetic.

The update rules are torch.optim's (Adam: bias-corrected moments, ``p -= lr * m_hat /
(sqrt(v_hat) + eps)``; SGD: ``buf = momentum * buf + g``, ``p -= lr * buf``). They are written
here because constructing a ``torch.optim`` optimiser imports ``torch._dynamo`` on first use,
which costs about a second per process on a CPU: more than a whole affine registration.
Training code keeps using ``torch.optim``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch


class AdamState:
    """First and second moment estimates of one tensor; :meth:`direction` gives Adam's step."""

    def __init__(self, like: torch.Tensor, betas: tuple[float, float] = (0.9, 0.999)):
        self.m = torch.zeros_like(like)
        self.v = torch.zeros_like(like)
        self.betas = betas
        self.t = 0

    @torch.no_grad()
    def direction(self, grad: torch.Tensor, lr: float, eps: float = 1e-8) -> torch.Tensor:
        """The update ``-lr * m_hat / (sqrt(v_hat) + eps)`` after accumulating ``grad``."""
        b1, b2 = self.betas
        self.t += 1
        self.m.mul_(b1).add_(grad, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        # sqrt(v_hat) = sqrt(v) / sqrt(1 - b2^t): one new tensor, updated in place (each
        # pass over a full-resolution field costs as much as the arithmetic)
        out = self.v.sqrt().div_(math.sqrt(1 - b2**self.t)).add_(eps)
        return torch.div(self.m, out, out=out).mul_(-lr / (1 - b1**self.t))


class Optimizer:
    """``adam`` or ``sgd`` (momentum 0.9) over ``params``; the learning rate lives in
    ``param_groups[0]["lr"]`` as in torch.optim, so schedules set it the same way."""

    def __init__(self, params: Sequence[torch.Tensor], kind: str, lr: float) -> None:
        if kind not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {kind!r}")
        self.kind = kind
        self.params = list(params)
        self.param_groups: list[dict[str, Any]] = [{"params": self.params, "lr": float(lr)}]
        self.adam: dict[int, AdamState] = {}
        self.momentum: dict[int, torch.Tensor] = {}

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def updates(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each parameter that has a gradient, with the step the update rule takes it by (its
        state advanced, the parameter itself not changed): for callers that transform the
        step before applying it (e.g. smooth it)."""
        lr = float(self.param_groups[0]["lr"])
        out = []
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            if self.kind == "adam":
                state = self.adam.setdefault(i, AdamState(p))
                out.append((p, state.direction(p.grad, lr)))
            else:
                buf = self.momentum.get(i)
                buf = p.grad.clone() if buf is None else buf.mul_(0.9).add_(p.grad)
                self.momentum[i] = buf
                out.append((p, buf * -lr))
        return out

    @torch.no_grad()
    def step(self) -> None:
        for p, update in self.updates():
            p.add_(update)


def make_optimizer(params: Sequence[torch.Tensor], kind: str, lr: float) -> Optimizer:
    """``"adam"`` or ``"sgd"`` (with momentum 0.9) over ``params``."""
    return Optimizer(params, kind, lr)
