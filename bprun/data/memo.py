"""Datasets kept in memory between the runs of one process.

A search's worker (bprun.search.workers) runs trial after trial in one process;
its trials mostly read the same dataset, so it keeps each one it built, keyed by
the dataset node's settings, and hands the same splits to the next trial that
asks for them (loaders, samplers and augmentation are still made per run).
Anywhere else (`BPRUN_KEEP_DATASETS` unset) every run builds its own. A source
restored from a checkpoint's fitted state is never kept.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

ENV = "BPRUN_KEEP_DATASETS"
MAX_KEPT = 4  # distinct datasets a process keeps; the oldest goes first

_kept: dict[str, object] = {}


def dataset(args: dict, extras: dict, build: Callable[[], object]) -> object:
    """`build()`, or the dataset it gave for the same settings earlier in this process."""
    if os.environ.get(ENV) != "1" or "state" in extras:
        return build()
    key = json.dumps([args, extras], sort_keys=True, default=repr)
    if key not in _kept:
        while len(_kept) >= MAX_KEPT:
            _kept.pop(next(iter(_kept)))
        _kept[key] = build()
    return _kept[key]
