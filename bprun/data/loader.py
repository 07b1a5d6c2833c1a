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
from itertools import pairwise

import torch

from bprun.data.sampler import SeededSampler

BLOCK_BYTES = 64 * 2**20  # the most input a shuffled block gathers at once


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
        sampler: SeededSampler | None = None,
        epoch_inputs: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None,
    ):
        """`sampler`: the order to follow (e.g. a `BalancedSampler`); by default a
        `SeededSampler` of (batch_size, shuffle, seed, max_batches). `epoch_inputs(x, seed,
        epoch)`: the inputs of each epoch remade from `x` (sampled negatives)."""
        self.x, self.y = x, y
        # Inputs remade each epoch from (x, seed, epoch), e.g. sampled negatives (Dataset's).
        self.base_x, self.epoch_inputs = x, epoch_inputs
        self.transform = transform  # applied to each input batch (augmentation, dtype)
        if sampler is None:
            sampler = SeededSampler(len(x), batch_size, shuffle, seed, max_batches=max_batches)
        self.sampler = sampler

    def shard(self, rank: int, world_size: int) -> InMemoryLoader:
        """Make `batch_size` the global batch and yield this rank's share of each batch."""
        self.sampler = self.sampler.sharded(rank, world_size)
        return self

    def unsharded(self) -> InMemoryLoader:
        """The same data in whole global batches, as one process reads them (every rank holds
        all of it): what a pass that must equal one process's, such as SWA's BatchNorm
        statistics, reads."""
        if self.sampler.world_size == 1:
            return self
        s = self.sampler
        return InMemoryLoader(
            self.base_x,
            self.y,
            s.batch_size,
            transform=self.transform,
            sampler=s.unsharded(),
            epoch_inputs=self.epoch_inputs,
        )

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
        if self.epoch_inputs is not None:
            self.x = self.epoch_inputs(self.base_x, self.seed, epoch)
        order = self.order(epoch)
        gathered = self._gathered(order, start) if order is not None else None
        for b in range(start, self.sampler.num_batches):
            if gathered is None:  # contiguous: views, no copy
                lo, hi = self.sampler.positions(b)
                x, y = self.x[lo:hi], self.y[lo:hi]
            else:
                x, y = next(gathered)
            yield (x if self.transform is None else self.transform(x)), y

    def _gathered(
        self, order: torch.Tensor, start: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The shuffled batches, gathered a block of batches at a time.

        One `index_select` per block and a view per batch cost less than two gathers per
        batch (about 10 us a batch on a CPU, a share of a small model's step); a block holds
        at most `BLOCK_BYTES` of inputs, so memory grows by that much, not by the dataset."""
        row_bytes = self.x[:1].nbytes + self.y[:1].nbytes
        per_block = max(1, BLOCK_BYTES // max(1, row_bytes * self.sampler.batch_size))
        for first in range(start, self.sampler.num_batches, per_block):
            spans = [
                self.sampler.positions(b)
                for b in range(first, min(first + per_block, self.sampler.num_batches))
            ]
            if all(a[1] == b[0] for a, b in pairwise(spans)):
                idx = order[spans[0][0] : spans[-1][1]]  # one rank: the block is one slice
            else:
                idx = torch.cat([order[lo:hi] for lo, hi in spans])
            sizes = [hi - lo for lo, hi in spans]
            xs = self.x.index_select(0, idx).split(sizes)
            ys = self.y.index_select(0, idx).split(sizes)
            yield from zip(xs, ys, strict=True)

    def __iter__(self):
        return self.batches(0)
