"""The training engine: no Hydra, no YAML; objects and a settings dataclass in, results out."""

from bprun.engine.settings import TrainerSettings
from bprun.engine.trainer import Trainer

__all__ = ["Trainer", "TrainerSettings"]
