"""Convolutional nets for 1-D sequences (C, L) and 2-D images (C, H, W)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from bprun.models.checkpointing import CheckpointedStages
from bprun.models.layers import activation as make_activation
from bprun.models.layers import dropout as make_dropout

HEADS = ("gap", "flatten")


def per_stage(value: int | Sequence[int] | None, stages: int, name: str) -> list:
    """One value per conv stage: a scalar is repeated, a list must have one entry per stage."""
    if value is None or isinstance(value, int):
        return [value] * stages
    values = list(value)
    if len(values) != stages:
        raise ValueError(
            f"model.{name} has {len(values)} entries but model.channels has {stages} stages: "
            f"give one {name} per stage or a single number"
        )
    return values


class CNN(nn.Module):
    """Stages of conv -> [batch norm] -> activation, then a linear head.

    Between stages, `pool` halves the resolution (while the smallest side is at
    least 4); `stride` downsamples inside a conv instead. The head either
    averages over positions (`head=gap`, any input size) or flattens every
    position (`head=flatten`, the MNIST-1D paper's CNN). `padding=None` is
    `kernel_size // 2`, which keeps the length at stride 1.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        channels: Sequence[int] = (32, 64, 128),
        kernel_size: int | Sequence[int] = 5,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | None = None,
        activation: str = "relu",
        batch_norm: bool = True,
        pool: str = "max",
        dropout: float = 0.0,
        head: str = "gap",
    ):
        super().__init__()
        if len(input_shape) not in (2, 3):
            raise ValueError(
                f"model=cnn needs inputs shaped (C, L) or (C, H, W), got {tuple(input_shape)}: "
                "use model=mlp or model=logreg for flat feature vectors"
            )
        if not channels:
            raise ValueError("model.channels is empty: give at least one stage, e.g. [32, 64]")
        if head not in HEADS:
            raise ValueError(f"unknown model.head '{head}': choose one of {', '.join(HEADS)}")
        two_d = len(input_shape) == 3
        conv = nn.Conv2d if two_d else nn.Conv1d
        norm = nn.BatchNorm2d if two_d else nn.BatchNorm1d
        pools = {
            "max": nn.MaxPool2d if two_d else nn.MaxPool1d,
            "avg": nn.AvgPool2d if two_d else nn.AvgPool1d,
        }
        if pool not in (*pools, "none"):
            raise ValueError(f"unknown model.pool '{pool}': choose one of max, avg, none")
        stages = len(channels)
        kernels = per_stage(kernel_size, stages, "kernel_size")
        strides = per_stage(stride, stages, "stride")
        paddings = per_stage(padding, stages, "padding")

        layers: list[nn.Module] = []
        sides = list(input_shape[1:])  # spatial size after each layer, for the flatten head
        c_in = input_shape[0]
        starts = []  # index of each stage's first layer (its pooling, then its conv)
        for i, (c_out, k, s, p) in enumerate(
            zip(channels, kernels, strides, paddings, strict=True)
        ):
            starts.append(len(layers))
            if i > 0 and pool != "none" and min(sides) >= 4:
                layers.append(pools[pool](2))
                sides = [side // 2 for side in sides]
            p = k // 2 if p is None else p
            layers += [
                conv(c_in, c_out, k, stride=s, padding=p, bias=not batch_norm),
                norm(c_out) if batch_norm else nn.Identity(),
                make_activation(activation),
            ]
            sides = [(side + 2 * p - k) // s + 1 for side in sides]
            if min(sides) < 1:
                raise ValueError(
                    f"inputs shaped {tuple(input_shape)} shrink to nothing at conv stage {i + 1}: "
                    "use fewer model.channels stages, a smaller model.stride or kernel_size, "
                    "or more model.padding"
                )
            c_in = c_out
        self.features = CheckpointedStages(*layers, starts=starts)
        if head == "gap":
            self.pool = nn.Sequential(
                nn.AdaptiveAvgPool2d(1) if two_d else nn.AdaptiveAvgPool1d(1), nn.Flatten(1)
            )
            width = c_in
        else:
            self.pool = nn.Flatten(1)
            width = c_in * math.prod(sides)
        self.dropout = make_dropout(dropout)
        self.head = nn.Linear(width, num_classes)

    def enable_activation_checkpointing(self) -> int:
        self.features.checkpointed = True
        return len(self.features.starts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.pool(self.features(x))))
