"""What the Trainer needs to know about data parallelism: its rank, the world, and
the few collectives that keep ranks in agreement.

The process group itself is started by the launcher (`bprun.launch`); the
engine only uses it. With one process (`Single`) every call is free and
nothing touches `torch.distributed`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, TensorBoard and metrics.json."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce `t` in place by sum (a no-op with one process)."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_(self, t: torch.Tensor) -> torch.Tensor:
        """Overwrite `t` in place with rank 0's values."""
        if self.enabled:
            dist.broadcast(t, src=0)
        return t

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when `flag` is true on any: how ranks agree to stop."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def max_int(self, value: int, device: torch.device) -> int:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def gather(self, obj) -> list:
        """Every rank's `obj` (plain values and tensors), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


SINGLE = DistContext()


def current() -> DistContext:
    """The context of this process: its rank once a launcher started the process group."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", 0))
        return DistContext(dist.get_rank(), dist.get_world_size(), local)
    return SINGLE
