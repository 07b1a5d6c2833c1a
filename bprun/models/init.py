"""Weight initialisation by name, applied to weights of Linear/Conv/RNN layers, biases zeroed."""

from __future__ import annotations

from torch import nn

INITS = {
    "xavier_uniform": nn.init.xavier_uniform_,
    "xavier_normal": nn.init.xavier_normal_,
    "kaiming_uniform": lambda w: nn.init.kaiming_uniform_(w, nonlinearity="relu"),
    "kaiming_normal": lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),
    "orthogonal": nn.init.orthogonal_,
}


def init_weights(model: nn.Module, scheme: str = "default") -> nn.Module:
    """Re-initialise `model` in place; "default" keeps PyTorch's own initialisation."""
    if scheme == "default":
        return model
    if scheme not in INITS:
        raise ValueError(
            f"unknown model.init '{scheme}': choose one of default, {', '.join(INITS)}"
        )
    fill = INITS[scheme]
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.RNNBase)):
            for name, param in module.named_parameters(recurse=False):
                if name.startswith("weight") and param.dim() >= 2:
                    fill(param)
                elif name.startswith("bias"):
                    nn.init.zeros_(param)
    return model
