"""The training engine: no Hydra, no YAML; objects and a settings dataclass in, results out.

    from bprun.engine import Trainer, TrainerSettings

Names load on first use, so importing the settings does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Trainer": "bprun.engine.trainer",
    "TrainerSettings": "bprun.engine.settings",
    "Callback": "bprun.engine.callbacks",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bprun.engine' has no attribute '{name}'")
