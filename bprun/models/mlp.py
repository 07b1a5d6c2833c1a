"""The multi-layer perceptron: fully connected blocks over the flattened input."""

from __future__ import annotations

import math

import torch
from torch import nn

from bprun.models.checkpointing import checkpoint_module
from bprun.models.layers import activation as make_activation
from bprun.models.layers import dropout as make_dropout
from bprun.models.layers import norm1d


class MLP(nn.Module):
    """Fully connected net over the flattened input.

    Each hidden block is Linear -> norm -> activation -> dropout; with
    `residual=True`, blocks whose input and output widths match add a skip
    connection. `hidden=[]` is a linear model. Under `norm=batch` the Linear has no
    bias, as a convolution before BatchNorm has none: the normalisation subtracts it
    again, so its gradient would be rounding noise, which Adam turns into whole steps.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        hidden: list[int] = (256, 256),
        activation: str = "relu",
        norm: str | None = "none",
        dropout: float = 0.0,
        residual: bool = False,
    ):
        super().__init__()
        if any(w < 1 for w in hidden):
            raise ValueError(f"model.hidden widths must be positive, got {list(hidden)}")
        widths = [math.prod(input_shape), *hidden]
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Linear(w_in, w_out, bias=norm != "batch"),
                norm1d(norm, w_out),
                make_activation(activation),
                make_dropout(dropout),
            )
            for w_in, w_out in zip(widths[:-1], widths[1:], strict=True)
        )
        self.residual = residual
        self.head = nn.Linear(widths[-1], num_classes)

    def upgrade_state(self, state: dict, prefix: str) -> dict:
        """A checkpoint of a `norm=batch` MLP whose Linears had a bias: each bias folded into
        its BatchNorm's running mean (mean - bias), which gives the same outputs in eval
        mode, and in training mode the normalisation removes it anyway."""
        for i, block in enumerate(self.blocks):
            linear, norm = block[0], block[1]
            bias_key = f"{prefix}blocks.{i}.0.bias"
            if linear.bias is not None or bias_key not in state:
                continue
            bias = state.pop(bias_key)
            mean_key = f"{prefix}blocks.{i}.1.running_mean"
            if getattr(norm, "track_running_stats", False) and mean_key in state:
                state[mean_key] = state[mean_key] - bias
        return state

    def enable_activation_checkpointing(self) -> int:
        for block in self.blocks:
            checkpoint_module(block)
        return len(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for block in self.blocks:
            y = block(x)
            x = x + y if self.residual and y.shape == x.shape else y
        return self.head(x)
