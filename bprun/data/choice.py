"""Which path the batches take (`dataset.loader`), and what the streaming DataLoader is told.

`auto` keeps the in-memory, device-resident path when the decoded data fits
within `dataset.memory_budget`, and streams through DataLoader workers
otherwise; the choice and its reason are logged when the run starts.
"""

from __future__ import annotations

import inspect
import logging
import re
from dataclasses import dataclass

import torch
from hydra.utils import get_method

from bprun.data.sources import nbytes
from bprun.errors import BprunError

log = logging.getLogger("bprun")

UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(value) -> int:
    """Bytes from 123, '512MB', '8GiB', '1.5g' (decimal k/M/G/T, binary KiB/MiB/GiB/TiB)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", str(value).lower())
    if not m:
        raise BprunError(
            f"dataset.memory_budget={value} is not a size: write e.g. 512MB, 8GiB or a byte count"
        )
    number, unit, binary = float(m.group(1)), m.group(2), m.group(3)
    factor = 1024 ** "kmgt".index(unit) * 1024 if binary and unit else UNITS[unit]
    return int(number * factor)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass
class LoaderOptions:
    loader: str
    memory_budget: int
    num_workers: int
    pin_memory: bool
    persistent_workers: bool
    prefetch_factor: int

    @classmethod
    def from_settings(cls, own: dict, device: torch.device) -> LoaderOptions:
        if own["loader"] not in ("auto", "memory", "stream"):
            raise BprunError(
                f"dataset.loader must be auto, memory or stream, got '{own['loader']}'"
            )
        workers = own["num_workers"]
        if not isinstance(workers, int) or workers < 0:
            raise BprunError(f"dataset.num_workers must be an integer >= 0, got {workers}")
        prefetch = own["prefetch_factor"]
        if not isinstance(prefetch, int) or prefetch < 1:
            raise BprunError(f"dataset.prefetch_factor must be an integer >= 1, got {prefetch}")
        pin = own["pin_memory"]
        return cls(
            loader=own["loader"],
            memory_budget=parse_size(own["memory_budget"]),
            num_workers=workers,
            pin_memory=torch.device(device).type == "cuda" if pin is None else bool(pin),
            persistent_workers=bool(own["persistent_workers"]),
            prefetch_factor=prefetch,
        )

    def dataloader_kwargs(self) -> dict:
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers,
            "prefetch_factor": self.prefetch_factor,
        }


def choose_path(opts: LoaderOptions, parts: list) -> str:
    """'memory' or 'stream' for data made of `parts` (tensors or lazy files); logs why."""
    size = sum(nbytes(p) for p in parts)
    budget = f"dataset.memory_budget={human(opts.memory_budget)}"
    if opts.loader == "auto":
        path = "memory" if size <= opts.memory_budget else "stream"
        why = f"auto: {human(size)} decoded {'fits within' if path == 'memory' else 'exceeds'} {budget}"
    else:
        path, why = opts.loader, f"dataset.loader={opts.loader}; {human(size)} decoded"
    if path == "stream":
        how = f"DataLoader, {opts.num_workers} worker(s)"
        log.info(f"data: streaming ({how}) ({why})")
    else:
        log.info(f"data: in memory, on the training device ({why})")
    return path


def source_params(args: dict) -> set[str]:
    """The parameter names of the dataset node's `_target_`, when it is a plain callable."""
    try:
        return set(inspect.signature(get_method(args["_target_"])).parameters)
    except Exception:  # a bad target is reported by instantiate with its own message
        return set()


def source_extras(args: dict, own: dict, state: dict | None) -> dict:
    """Arguments bprun hands to sources that ask for them: the validation split's settings
    (sources that fit statistics carve validation themselves, before fitting), and the
    fitted `state` read back from a checkpoint."""
    params = source_params(args)
    extras = {k: own[k] for k in ("val_fraction", "val_seed") if k in params}
    if state and "state" in params:
        extras["state"] = state
    return extras


def worker_augment(settings: dict):
    """The augmentation the streaming workers apply to a decoded uint8 batch, or None."""
    from bprun.data.augment import ResizedCropFlip

    if settings["resized_crop"] is not None:
        return ResizedCropFlip(settings["resized_crop"], hflip=settings["hflip"])
    if settings["crop_padding"] or settings["hflip"]:
        return _SeededCropFlip(settings["crop_padding"], settings["hflip"])
    return None


class _SeededCropFlip:
    """CropFlip drawing from a given generator (the workers' per-batch one)."""

    def __init__(self, padding: int, hflip: bool):
        self.padding, self.hflip = padding, hflip

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        from bprun.data.augment import CropFlip

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            return CropFlip(self.padding, self.hflip)(x)
