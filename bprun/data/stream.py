"""Streaming batches through `torch.utils.data.DataLoader` workers, for data that does not fit.

The order is the same `SeededSampler` the in-memory loader uses. The
DataLoader's sampler yields one key per batch, (epoch, batch, indices), and a
worker turns the whole key into a batch: it decodes (and, for training,
augments) the examples itself, seeding its augmentation with the key, so
what a batch holds depends on the key alone, never on which worker made it or
on what that worker did before. A run resumed mid-epoch therefore sees the
same batches as one that never stopped, with any number of workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from torch.utils.data import DataLoader

from bprun.data.sampler import SeededSampler
from bprun.errors import BprunError


class BatchSource(Protocol):
    """What the workers read from: a whole batch at a time, by example indices."""

    def __len__(self) -> int: ...

    def fetch(self, indices: torch.Tensor, epoch: int, batch: int) -> tuple[torch.Tensor, ...]: ...


class TensorRows:
    """Rows of tensors already in (CPU) memory; the workers gather them."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def fetch(self, indices: torch.Tensor, epoch: int, batch: int):
        return self.x[indices], self.y[indices]


class _Keys:
    """The DataLoader's sampler: one (epoch, batch, indices) key per batch, from a start batch."""

    def __init__(self, sampler: SeededSampler):
        self.sampler, self.epoch, self.start = sampler, 0, 0

    def __iter__(self):
        for b, idx in self.sampler.batches(self.epoch, self.start):
            yield self.epoch, b, idx

    def __len__(self) -> int:
        return self.sampler.num_batches - self.start


class _Batches(torch.utils.data.Dataset):
    def __init__(self, source: BatchSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key):
        epoch, batch, indices = key
        return self.source.fetch(indices, epoch, batch)


class StreamLoader:
    """The in-memory loader's interface (`batches(epoch, start)`, `len`, `num_samples`,
    `batch_len`) over a DataLoader; batches are moved to `device` with `non_blocking` and
    then given to `transform` there (normalisation, and augmentation the workers did not do).
    """

    def __init__(
        self,
        source: BatchSource,
        sampler: SeededSampler,
        device: torch.device,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: int | None = 2,
    ):
        self.source, self.sampler, self.device = source, sampler, torch.device(device)
        self.transform = transform
        self.batch_size, self.shuffle, self.seed = sampler.batch_size, sampler.shuffle, sampler.seed
        self.num_batches = sampler.num_batches
        self.num_workers = num_workers
        self._options = {"pin_memory": pin_memory, "prefetch_factor": prefetch_factor}
        self._keys = _Keys(sampler)
        extra = {}
        if num_workers > 0:
            extra = {"persistent_workers": persistent_workers, "prefetch_factor": prefetch_factor}
        self.loader = DataLoader(
            _Batches(source),
            sampler=self._keys,
            batch_size=None,  # the key is the batch: workers build whole batches
            num_workers=num_workers,
            pin_memory=pin_memory and self.device.type == "cuda",
            # Its own generator, so creating an iterator never draws from the global RNG
            # (whose state the checkpoint holds); nothing in the workers uses that seed.
            generator=torch.Generator().manual_seed(0),
            **extra,
        )

    def __len__(self) -> int:
        return self.num_batches

    def shard(self, rank: int, world_size: int) -> StreamLoader:
        """Make `batch_size` the global batch and stream this rank's share of each batch."""
        self.sampler = self._keys.sampler = self.sampler.sharded(rank, world_size)
        self.batch_size, self.num_batches = self.sampler.batch_size, self.sampler.num_batches
        return self

    def unsharded(self) -> StreamLoader:
        """The same data in whole global batches, as one process streams them (for one pass,
        so its workers do not persist)."""
        if self.sampler.world_size == 1:
            return self
        return StreamLoader(
            self.source,
            self.sampler.unsharded(),
            self.device,
            self.transform,
            num_workers=self.num_workers,
            **self._options,
        )

    @property
    def num_samples(self) -> int:
        return self.sampler.num_samples

    def batch_len(self, index: int) -> int:
        return self.sampler.global_batch_len(index)

    def local_len(self, index: int) -> int:
        return self.sampler.batch_len(index)

    def batches(
        self, epoch: int = 0, start: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the batches of `epoch` from batch index `start` on, on the device."""
        if start >= self.num_batches:
            return
        self._keys.epoch, self._keys.start = epoch, start
        device = self.device
        for x, y in _one_line_errors(self.loader):
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            yield (x if self.transform is None else self.transform(x)), y

    def __iter__(self):
        return self.batches(0)


def _one_line_errors(loader: DataLoader):
    """The DataLoader's batches; a BprunError raised in a worker (an image that will not
    decode) arrives wrapped in the worker's traceback, and leaves with its own one line."""
    try:
        yield from loader
    except BprunError as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        last = lines[-1] if lines else str(e)
        prefix = "bprun.errors.BprunError: "
        raise BprunError(last[len(prefix) :] if last.startswith(prefix) else last) from None
