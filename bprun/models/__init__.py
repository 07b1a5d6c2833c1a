"""The model zoo. Every model takes `input_shape` and `num_classes` first."""

from bprun.models.cnn import CNN
from bprun.models.init import init_weights
from bprun.models.mlp import MLP

__all__ = ["CNN", "MLP", "init_weights"]
