"""Mixed precision: the autocast context and, for float16 on CUDA, a GradScaler."""

from __future__ import annotations

import contextlib

import torch

from bprun.errors import BprunError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BprunError(
            f"trainer.device='{name}' is not a device: use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BprunError(
            f"trainer.device='{name}' but CUDA is not available here: use trainer.device=cpu or auto"
        )
    return device


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision the device cannot run (before any data or model is built)."""
    if str(precision) == "16-mixed" and device.type != "cuda":
        raise BprunError(
            f"trainer.precision=16-mixed needs a CUDA device (this run is on {device.type}); "
            "use trainer.precision=bf16-mixed on the CPU"
        )


class Precision:
    def __init__(self, precision: str, device: torch.device):
        precision = str(precision)  # one of settings.PRECISIONS, checked with the settings
        check_precision(precision, device)
        self.name = precision
        self.device_type = device.type
        self.dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
        # Loss scaling only matters for float16: bfloat16 has float32's exponent range.
        self.scaler = torch.amp.GradScaler("cuda") if precision == "16-mixed" else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)
