"""Batches sliced from tensors that already live on the training device.

For data that fits in memory this replaces `torch.utils.data.DataLoader`,
whose per-batch Python work costs more than a small model's step. Each
epoch's order is a permutation drawn from a generator seeded with
(seed, epoch), so any position in the run, mid-epoch included, can be
reproduced from two integers.
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
        full = -(-len(x) // batch_size)
        self.num_batches = full if max_batches is None else max(1, min(full, max_batches))

    def __len__(self) -> int:
        return self.num_batches

    @property
    def num_samples(self) -> int:
        return min(len(self.x), self.num_batches * self.batch_size)

    def batch_len(self, index: int) -> int:
        """Number of samples in batch `index` of an epoch (the last one may be short)."""
        return min(self.batch_size, self.num_samples - index * self.batch_size)

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
            yield (x if self.transform is None else self.transform(x)), y

    def __iter__(self):
        return self.batches(0)
