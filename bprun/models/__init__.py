"""The model zoo. Every model takes `input_shape` and `num_classes` first.

`num_classes` is the width of the output: the number of classes for
classification, the number of targets (or a forecast horizon) for regression.
"""

from bprun.models.cnn import CNN
from bprun.models.init import init_weights
from bprun.models.linear import LinearModel
from bprun.models.mlp import MLP
from bprun.models.rnn import GRU, LSTM, RecurrentNet
from bprun.models.transformer import Transformer

__all__ = [
    "CNN",
    "GRU",
    "LSTM",
    "MLP",
    "LinearModel",
    "RecurrentNet",
    "Transformer",
    "init_weights",
    "resnet",
]


def __getattr__(name: str):
    # `resnet` needs torchvision, whose import pulls in torch._dynamo (seconds): load it only
    # for model=resnet. The function replaces the submodule of the same name on first use.
    if name == "resnet":
        from bprun.models.resnet import resnet

        globals()["resnet"] = resnet
        return resnet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
