"""Small shared pieces of the model zoo: activations and normalisation by name, and the
conversion of channels-first inputs into sequences of feature vectors."""

from __future__ import annotations

import torch
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
    """A fresh activation module for `model.activation=<name>`."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown model.activation '{name}': choose one of {', '.join(ACTIVATIONS)}"
        ) from None


def dropout(p: float) -> nn.Module:
    """`nn.Dropout(p)`, or nothing when p is 0; p outside [0, 1) names the setting."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"model.dropout must be in [0, 1), got {p}")
    return nn.Dropout(p) if p > 0 else nn.Identity()


def norm1d(kind: str | None, width: int) -> nn.Module:
    """Normalisation of (N, width) features: none | batch | layer."""
    kind = "none" if kind is None else kind
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm1d(width)
    if kind == "layer":
        return nn.LayerNorm(width)
    raise ValueError(f"unknown model.norm '{kind}': choose one of none, batch, layer")


def sequence_dims(input_shape: tuple[int, ...], model: str) -> tuple[int, int]:
    """(time steps, features per step) of a channels-first input.

    A sequence (C, L) is L steps of C features; an image (C, H, W) is read row by
    row, H steps of C*W features (the classic pixel-row RNN).
    """
    shape = tuple(input_shape)
    if len(shape) == 2:
        return shape[1], shape[0]
    if len(shape) == 3:
        return shape[1], shape[0] * shape[2]
    raise ValueError(
        f"model={model} needs sequences (C, L) or images (C, H, W), got inputs shaped {shape}: "
        "use model=mlp or model=logreg for flat feature vectors"
    )


def to_sequence(x: torch.Tensor) -> torch.Tensor:
    """(N, C, L) -> (N, L, C) and (N, C, H, W) -> (N, H, C*W): batch, time, features."""
    if x.dim() == 3:
        return x.transpose(1, 2)
    n, c, h, w = x.shape
    return x.permute(0, 2, 1, 3).reshape(n, h, c * w)
