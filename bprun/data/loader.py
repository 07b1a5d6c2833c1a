"""Batches sliced from tensors that already live on the training device.

For data that fits in memory this replaces `torch.utils.data.DataLoader`,
whose per-batch Python work costs more than a small model's step. The order
is the `SeededSampler`'s, the same one the streaming loader follows, so the
two paths see the same batches for the same seed, and any position in a run,
mid-epoch included, is two integers (epoch, batch).

Under data parallelism every rank builds the same loader and calls
`shard(rank, world_size)`: batches become global batches (per-rank batch x
world size) of the same seeded order, and each rank takes its share of each
one, so the samples per epoch and each update's samples match one process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from bprun.data.sampler import SeededSampler


class InMemoryLoader:
    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        max_batches: int | None = None,
    ):
        self.x, self.y = x, y
        self.transform = transform  # applied to each input batch (augmentation, dtype)
        self.sampler = SeededSampler(len(x), batch_size, shuffle, seed, max_batches=max_batches)

    def shard(self, rank: int, world_size: int) -> InMemoryLoader:
        """Make `batch_size` the global batch and yield this rank's share of each batch."""
        self.sampler = self.sampler.sharded(rank, world_size)
        return self

    batch_size = property(lambda self: self.sampler.batch_size)  # the global batch
    num_batches = property(lambda self: self.sampler.num_batches)
    num_samples = property(lambda self: self.sampler.num_samples)
    shuffle = property(lambda self: self.sampler.shuffle)
    seed = property(lambda self: self.sampler.seed)

    def __len__(self) -> int:
        return self.sampler.num_batches

    def batch_len(self, index: int) -> int:
        """Samples in global batch `index` (the last one may be short)."""
        return self.sampler.global_batch_len(index)

    def local_len(self, index: int) -> int:
        """Samples of batch `index` on this rank (0 when it holds only the stand-in)."""
        return self.sampler.batch_len(index)

    def order(self, epoch: int) -> torch.Tensor | None:
        """The epoch's permutation, on the data's device (None when not shuffling)."""
        order = self.sampler.order(epoch)
        return None if order is None else order.to(self.x.device)

    def batches(
        self, epoch: int = 0, start: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the batches of `epoch` from batch index `start` on."""
        order = self.order(epoch)
        for b in range(start, self.sampler.num_batches):
            lo, hi = self.sampler.positions(b)
            if order is None:  # contiguous: views, no copy
                x, y = self.x[lo:hi], self.y[lo:hi]
            else:
                idx = order[lo:hi]
                x, y = self.x[idx], self.y[idx]
            yield (x if self.transform is None else self.transform(x)), y

    def __iter__(self):
        return self.batches(0)
