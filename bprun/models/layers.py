"""Small shared pieces of the model zoo: activations by name, normalisation by name."""

from __future__ import annotations

from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation '{name}': choose one of {', '.join(ACTIVATIONS)}"
        ) from None


def norm1d(kind: str | None, width: int) -> nn.Module:
    """Normalisation of (N, width) features: none | batch | layer."""
    kind = "none" if kind is None else kind
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm1d(width)
    if kind == "layer":
        return nn.LayerNorm(width)
    raise ValueError(f"unknown norm '{kind}': choose one of none, batch, layer")
