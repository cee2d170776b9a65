"""Several processes, one job: the ``torchrun`` environment as unireg uses it.

``torchrun --nproc-per-node N [--nnodes M ...] -m unireg train|batch ...`` starts one process
per rank with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set;
:meth:`Distributed.from_environment` joins the process group (NCCL on GPUs, gloo on CPUs) and
picks the rank's device (``cuda:LOCAL_RANK``). Without those variables it is a one-process
world and every collective is the identity, so the same code runs alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist

from unireg.errors import UniregError


@dataclass
class Distributed:
    """This process's place in the job: ``rank`` of ``world_size`` (``local_rank`` on its
    node) and its device (None: the caller's choice, in a one-process world)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    joined: bool = False

    @classmethod
    def from_environment(cls, device: str = "cpu") -> Distributed:
        """Join the ``torchrun`` process group when ``WORLD_SIZE`` > 1 (``device`` "cuda":
        NCCL and ``cuda:LOCAL_RANK``; "cpu": gloo), else a one-process world."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", "0"))
        except ValueError as err:
            raise UniregError(f"unreadable torchrun environment ({err})") from err
        if world <= 1:
            return cls()
        if device == "cuda":
            if not torch.cuda.is_available():
                raise UniregError("--device cuda was asked for but CUDA is not available here")
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
            backend = "nccl"
        else:
            dev, backend = torch.device("cpu"), "gloo"
        if not torch_dist.is_initialized():
            torch_dist.init_process_group(backend=backend)
        return cls(rank, world, local, dev, True)

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that writes shared files)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.joined:
            torch_dist.barrier()

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.joined:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out

    def sum(self, value: float) -> float:
        """The sum of ``value`` over the ranks."""
        if not self.joined:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
        return float(t.item())

    def sum_gradients(self, module: torch.nn.Module) -> None:
        """Replace each parameter's gradient by its sum over the ranks: one all-reduce of all
        gradients flattened together (what DistributedDataParallel does in buckets during
        the backward pass). A parameter without a gradient on some rank (its draw did not
        use it) counts as zero there; one without a gradient on every rank keeps none."""
        if not self.joined:
            return
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            return
        dev = params[0].device
        used = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=dev)
        torch_dist.all_reduce(used, op=torch_dist.ReduceOp.SUM)
        chosen = [p for p, n in zip(params, used.tolist(), strict=True) if n > 0]
        for p in chosen:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if not chosen:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in chosen])  # type: ignore[union-attr]
        torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
        offset = 0
        for p in chosen:
            grad = p.grad
            assert grad is not None
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers."""
        if not self.joined:
            return
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                torch_dist.broadcast(t.data, src=0)

    def close(self) -> None:
        """Leave the process group once every rank has come here (no rank tears its
        connections down while another still talks to it)."""
        if self.joined and torch_dist.is_initialized():
            torch_dist.barrier()
            torch_dist.destroy_process_group()
            self.joined = False
