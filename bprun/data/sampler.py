"""The one data order: a seeded permutation per epoch, cut into global batches, shared by ranks.

Every loader (tensors on the device, or a `DataLoader` streaming from disk)
asks this sampler which examples make up batch `b` of epoch `e`, so the order
depends on (seed, epoch, batch) alone and any position in a run, mid-epoch
included, is two integers. With `world_size` processes each global batch is
split into `world_size` contiguous shares, one per rank: together the ranks
see exactly the batches, and the samples per epoch, of a one-process run.
A last batch smaller than the world leaves some ranks no share; they get one
stand-in example (the batch's first), which the trainer weights by zero, so
every rank still joins each gradient all-reduce.

`BalancedSampler` (`dataset.sampler=balanced`) replaces the permutation by a
seeded weighted draw with replacement, each class drawn equally often in
expectation; the rest (batches, shares, resume) is the same.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of one epoch's permutation (also used to seed per-batch augmentation)."""
    return (seed * 1_000_003 + epoch) % (2**63)


class SeededSampler:
    """Batches of example indices for (epoch, batch), for one rank of `world_size`.

    `batch_size` is the global batch; rank `r` gets share `r` of it (shares differ
    in size by at most one when the batch does not divide evenly). Without
    shuffling the order is 0..N-1 every epoch.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_batches: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of world_size={world_size} processes")
        if batch_size < world_size:
            raise ValueError(
                f"batch_size={batch_size} cannot be shared by {world_size} processes: "
                f"use at least {world_size}"
            )
        self.num_examples = num_examples
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.max_batches = max_batches
        full = -(-num_examples // batch_size)
        self.num_batches = full if max_batches is None else max(1, min(full, max_batches))

    def __len__(self) -> int:
        return self.num_batches

    def _with(self, **changes) -> SeededSampler:
        """This sampler with some settings changed (its kind and class weights kept)."""
        settings = {
            "num_examples": self.num_examples,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "max_batches": self.max_batches,
            **changes,
        }
        return type(self)(**settings, **self._own_settings())

    def _own_settings(self) -> dict:
        return {}

    def sharded(self, rank: int, world_size: int) -> SeededSampler:
        """This sampler's batch as the per-rank batch: the global batch is `world_size` times it."""
        if world_size == 1:
            return self
        return self._with(batch_size=self.batch_size * world_size, rank=rank, world_size=world_size)

    def unsharded(self) -> SeededSampler:
        """The whole global batches, as one process reads them."""
        if self.world_size == 1:
            return self
        return self._with(rank=0, world_size=1)

    @property
    def num_samples(self) -> int:
        """Examples per epoch over all ranks."""
        return min(self.num_examples, self.num_batches * self.batch_size)

    def order(self, epoch: int) -> torch.Tensor | None:
        """The epoch's permutation of all examples (CPU), or None when not shuffling."""
        if not self.shuffle:
            return None
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        return torch.randperm(self.num_examples, generator=g)

    def global_bounds(self, index: int) -> tuple[int, int]:
        """[start, end) positions of global batch `index` in the epoch's order."""
        start = index * self.batch_size
        return start, min(start + self.batch_size, self.num_samples)

    def bounds(self, index: int) -> tuple[int, int]:
        """[start, end) positions of this rank's share of global batch `index`."""
        start, end = self.global_bounds(index)
        if self.world_size == 1:
            return start, end
        n = end - start
        base, extra = divmod(n, self.world_size)
        lo = start + self.rank * base + min(self.rank, extra)
        return lo, lo + base + (1 if self.rank < extra else 0)

    def batch_len(self, index: int) -> int:
        """Samples in this rank's share of batch `index` (the last batch may be short; 0 when
        the rank only holds the stand-in)."""
        start, end = self.bounds(index)
        return end - start

    def positions(self, index: int) -> tuple[int, int]:
        """[start, end) positions this rank reads for batch `index`: its share, or the
        stand-in when the share is empty."""
        start, end = self.bounds(index)
        if start == end:
            start = self.global_bounds(index)[0]
            end = start + 1
        return start, end

    def global_batch_len(self, index: int) -> int:
        start, end = self.global_bounds(index)
        return end - start

    def indices(self, epoch: int, index: int, order: torch.Tensor | None = None) -> torch.Tensor:
        """Example indices of this rank's share of batch `index` of `epoch`."""
        start, end = self.positions(index)
        if not self.shuffle:
            return torch.arange(start, end)
        order = self.order(epoch) if order is None else order
        return order[start:end]

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """(batch index, example indices) for this rank, from batch `start` of `epoch` on."""
        order = self.order(epoch)
        for b in range(start, self.num_batches):
            yield b, self.indices(epoch, b, order)


class BalancedSampler(SeededSampler):
    """`dataset.sampler=balanced`: each epoch draws as many examples as there are, with
    replacement, each with probability inverse to its class's frequency, so every class is
    drawn equally often in expectation (torch's WeightedRandomSampler with inverse-frequency
    weights). The draw is seeded by (seed, epoch) alone and cut into global batches like the
    permutation it replaces, so resume mid-epoch and sharding over ranks stay exact.
    """

    def __init__(self, num_examples: int, batch_size: int, *args, weights: torch.Tensor, **kw):
        super().__init__(num_examples, batch_size, *args, **kw)
        if len(weights) != num_examples:
            raise ValueError(f"{len(weights)} sampling weights for {num_examples} examples")
        # the cumulative weights: a draw is a uniform number looked up in them (inverse CDF),
        # which, unlike torch.multinomial, has no 2**24 limit on the number of examples
        self.weights = weights.double().cpu()
        self._cdf = self.weights.cumsum(0)

    @classmethod
    def for_labels(cls, labels: torch.Tensor, batch_size: int, seed: int = 0, **kw):
        """Inverse-frequency weights of int class `labels` (N,): 1 / (examples of its class)."""
        labels = labels.cpu().long()
        counts = torch.bincount(labels)
        return cls(len(labels), batch_size, True, seed, weights=1.0 / counts[labels].double(), **kw)

    def _own_settings(self) -> dict:
        return {"weights": self.weights}

    def order(self, epoch: int) -> torch.Tensor | None:
        """The epoch's draw: `num_examples` example indices, repeats allowed (CPU)."""
        if not self.shuffle:
            return None
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        u = torch.rand(self.num_examples, generator=g, dtype=torch.float64) * self._cdf[-1]
        return torch.searchsorted(self._cdf, u, right=True).clamp_(max=self.num_examples - 1)
