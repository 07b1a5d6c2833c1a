"""Batches sliced from tensors that already live on the training device.

For data that fits in memory this replaces `torch.utils.data.DataLoader`,
whose per-batch Python work costs more than a small model's step. Each
epoch's order is a permutation drawn from a generator seeded with
(seed, epoch), so any position in the run, mid-epoch included, can be
reproduced from two integers.

Under data parallelism every rank builds the same loader and calls
`shard(rank, world_size)`: batches become global batches (per-rank batch x
world size) of the same seeded order, and each rank takes its part of each
one, so the samples per epoch and each update's samples match one process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch


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
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.transform = transform  # applied to each input batch (augmentation, dtype)
        self.max_batches = max_batches
        self.rank, self.world_size = 0, 1
        self._count_batches()

    def _count_batches(self) -> None:
        full = -(-len(self.x) // self.batch_size)
        limit = self.max_batches
        self.num_batches = full if limit is None else max(1, min(full, limit))

    def shard(self, rank: int, world_size: int) -> InMemoryLoader:
        """Make `batch_size` the global batch and yield this rank's part of each batch."""
        if world_size > 1:
            self.batch_size *= world_size
            self.rank, self.world_size = rank, world_size
            self._count_batches()
        return self

    def __len__(self) -> int:
        return self.num_batches

    @property
    def num_samples(self) -> int:
        return min(len(self.x), self.num_batches * self.batch_size)

    def batch_len(self, index: int) -> int:
        """Number of samples in batch `index` of an epoch (the last one may be short)."""
        return min(self.batch_size, self.num_samples - index * self.batch_size)

    def local_len(self, index: int) -> int:
        """Samples of batch `index` on this rank (`torch.tensor_split`'s sizes)."""
        n = self.batch_len(index)
        return n // self.world_size + (1 if self.rank < n % self.world_size else 0)

    def order(self, epoch: int) -> torch.Tensor | None:
        if not self.shuffle:
            return None
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
        return torch.randperm(len(self.x), generator=g).to(self.x.device)

    def batches(
        self, epoch: int = 0, start: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the batches of `epoch` from batch index `start` on."""
        perm = self.order(epoch)
        bs = self.batch_size
        for i in range(start, self.num_batches):
            if perm is None:
                x, y = self.x[i * bs : (i + 1) * bs], self.y[i * bs : (i + 1) * bs]
            else:
                idx = perm[i * bs : (i + 1) * bs]
                x, y = self.x[idx], self.y[idx]
            if self.world_size > 1:
                x, y = self._part(x), self._part(y)
            yield (x if self.transform is None else self.transform(x)), y

    def _part(self, t: torch.Tensor) -> torch.Tensor:
        part = torch.tensor_split(t, self.world_size)[self.rank]
        # A global batch smaller than the world leaves some ranks nothing; they still run
        # the step (every rank joins each gradient all-reduce) on one sample that the
        # trainer weights by zero (local_len is 0).
        return part if len(part) else t[:1]

    def __iter__(self):
        return self.batches(0)
