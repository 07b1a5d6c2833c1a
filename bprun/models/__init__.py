"""The model zoo. Every model takes `input_shape` and `num_classes` first.

`num_classes` is the width of the output: the number of classes for
classification, the number of targets (or a forecast horizon) for regression.
`bprun.models.resnet.resnet` is not imported here: it needs torchvision, whose
import pulls in torch._dynamo (seconds), so only model=resnet pays for it.
"""

from bprun.models.cnn import CNN
from bprun.models.forecast import LinearForecaster
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
    "LinearForecaster",
    "LinearModel",
    "RecurrentNet",
    "Transformer",
    "init_weights",
]
