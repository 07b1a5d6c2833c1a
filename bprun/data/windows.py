"""Batches of token windows read straight from a memory-mapped token stream.

A batch is `batch_size` windows of `block_size + 1` consecutive tokens; the input is the
first `block_size`, the target the last `block_size` (the next token at each position).
Only the windows' tokens are read from the file, so the corpus never has to fit in memory.

Where the windows start:
- training: random, drawn from a generator seeded by (seed, epoch, batch) alone, so any
  position in a run is two integers and a resumed run reads the same windows as one that
  never stopped. Under DDP every rank draws the same global batch and keeps its own share
  (the `SeededSampler`'s split): the ranks read different windows, and together the
  windows of a one-process run;
- validation with `windows` (trainer.val_batches): a fixed random set, seeded by `seed`
  alone, the same at every check;
- otherwise consecutive windows that do not overlap, covering the split once.

The interface is the in-memory loader's (`batches(epoch, start)`, `len`, `batch_size`,
`num_samples`, `batch_len`, `local_len`, `shard`, `unsharded`), so the trainer needs nothing
else; `tokens_per_sample` lets it report tokens per second.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from bprun.data.sampler import SeededSampler


class WindowLoader:
    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        batch_size: int,
        device: torch.device | str = "cpu",
        mode: str = "random",  # random (per epoch and batch) | fixed | sequential
        seed: int = 0,
        num_batches: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.tokens, self.block_size, self.mode = tokens, block_size, mode
        self.device = torch.device(device)
        self.seed, self.shuffle = seed, mode != "sequential"
        self.tokens_per_sample = block_size
        self._offsets = np.arange(block_size + 1, dtype=np.int64)
        self.positions = max(0, len(tokens) - block_size)  # window starts that fit
        self._init_args = (tokens, block_size, batch_size, device, mode, seed, num_batches)
        self._layout(batch_size, num_batches, rank, world_size)

    def _layout(self, batch_size: int, num_batches: int | None, rank: int, world: int) -> None:
        """`batch_size` per rank; the global batch is `world` times it."""
        block, glob = self.block_size, batch_size * world
        if self.mode == "sequential":
            windows = (len(self.tokens) - 1) // block if len(self.tokens) > block else 0
            total = -(-windows // glob)
            if num_batches is not None:
                total = min(total, num_batches)
            windows = min(windows, total * glob)
        else:
            total = num_batches if num_batches is not None else 1
            windows = total * glob
        self.num_windows = windows
        self.sampler = SeededSampler(max(windows, 1), glob, False, self.seed, rank, world)
        self.num_batches = total if windows else 0

    batch_size = property(lambda self: self.sampler.batch_size)  # the global batch

    def shard(self, rank: int, world_size: int) -> WindowLoader:
        if world_size > 1:
            _, _, batch_size, _, _, _, num_batches = self._init_args
            self._layout(batch_size, num_batches, rank, world_size)
        return self

    def unsharded(self) -> WindowLoader:
        return WindowLoader(*self._init_args) if self.sampler.world_size > 1 else self

    @property
    def num_samples(self) -> int:
        return self.num_windows

    def __len__(self) -> int:
        return self.num_batches

    def batch_len(self, index: int) -> int:
        return self.sampler.global_batch_len(index)

    def local_len(self, index: int) -> int:
        return self.sampler.batch_len(index)

    def starts(self, epoch: int, index: int) -> np.ndarray:
        """The start of every window of global batch `index` of `epoch`."""
        lo, hi = self.sampler.global_bounds(index)
        if self.mode == "sequential":
            return np.arange(lo, hi, dtype=np.int64) * self.block_size
        key = [self.seed, epoch, index] if self.mode == "random" else [self.seed, index]
        rng = np.random.default_rng(key)
        return rng.integers(0, self.positions, size=hi - lo, dtype=np.int64)

    def batch(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.starts(epoch, index)
        lo, hi = self.sampler.positions(index)
        first = self.sampler.global_bounds(index)[0]
        mine = starts[lo - first : hi - first]
        rows = np.asarray(self.tokens[mine[:, None] + self._offsets], dtype=np.int64)
        data = torch.from_numpy(rows)
        if self.device.type == "cuda":
            data = data.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            data = data.to(self.device)
        return data[:, :-1], data[:, 1:]

    def batches(
        self, epoch: int = 0, start: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in range(start, self.num_batches):
            yield self.batch(epoch, b)

    def __iter__(self):
        return self.batches(0)
