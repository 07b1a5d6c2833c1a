"""Weight initialisation by name (`model.init=<scheme>`), applied after a model is built.

Every weight matrix of a Linear, convolution, recurrent or attention layer is
refilled and its biases zeroed; normalisation layers, embeddings such as a
positional table or a class token, and anything else keep their own
initialisation. Recurrent and attention weights stack several matrices (a GRU's
three gates, an LSTM's four, attention's query/key/value); each is filled on
its own, so `orthogonal` gives an orthogonal matrix per gate.
"""

from __future__ import annotations

import torch
from torch import nn

INITS = {
    "xavier_uniform": nn.init.xavier_uniform_,
    "xavier_normal": nn.init.xavier_normal_,
    "kaiming_uniform": lambda w: nn.init.kaiming_uniform_(w, nonlinearity="relu"),
    "kaiming_normal": lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),
    "orthogonal": nn.init.orthogonal_,
}
SCHEMES = ("default", *INITS)
LAYERS = (nn.Linear, nn.modules.conv._ConvNd, nn.RNNBase, nn.MultiheadAttention)


def _blocks(module: nn.Module, name: str, weight: torch.Tensor) -> int:
    """How many matrices are stacked along dim 0 of `weight`."""
    if isinstance(module, nn.RNNBase) and not name.startswith("weight_hr"):
        return weight.shape[0] // module.hidden_size  # gates: RNN 1, GRU 3, LSTM 4
    if isinstance(module, nn.MultiheadAttention) and name == "in_proj_weight":
        return 3  # query, key, value
    return 1


@torch.no_grad()
def init_weights(model: nn.Module, scheme: str = "default") -> nn.Module:
    """Re-initialise `model` in place; "default" keeps each layer's own initialisation."""
    if scheme == "default":
        return model
    if scheme not in INITS:
        raise ValueError(f"unknown model.init '{scheme}': choose one of {', '.join(SCHEMES)}")
    fill = INITS[scheme]
    for module in model.modules():
        if not isinstance(module, LAYERS):
            continue
        for name, param in module.named_parameters(recurse=False):
            if "bias" in name:
                nn.init.zeros_(param)
            elif "weight" in name and param.dim() >= 2:
                for block in param.chunk(_blocks(module, name, param), dim=0):
                    fill(block)
    return model
