from __future__ import annotations

import torch
from torch import nn

from bprun.models.layers import activation as make_activation


class CNN(nn.Module):
    """Convolutional classifier for 1-D sequences (C, L) and 2-D images (C, H, W).

    Stages of conv -> [batch norm] -> activation, with pooling that halves the
    resolution between stages, then global average pooling and a linear head.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        channels: list[int] = (32, 64, 128),
        kernel_size: int = 5,
        activation: str = "relu",
        batch_norm: bool = True,
        pool: str = "max",
        dropout: float = 0.0,
    ):
        super().__init__()
        if len(input_shape) not in (2, 3):
            raise ValueError(
                f"CNN needs inputs shaped (C, L) or (C, H, W), got {tuple(input_shape)}"
            )
        two_d = len(input_shape) == 3
        Conv = nn.Conv2d if two_d else nn.Conv1d
        Norm = nn.BatchNorm2d if two_d else nn.BatchNorm1d
        pools = {
            "max": nn.MaxPool2d if two_d else nn.MaxPool1d,
            "avg": nn.AvgPool2d if two_d else nn.AvgPool1d,
        }
        if pool not in (*pools, "none"):
            raise ValueError(f"unknown pool '{pool}': choose one of max, avg, none")
        layers: list[nn.Module] = []
        size = min(input_shape[1:])  # smallest spatial side: stop pooling at 2
        c_in = input_shape[0]
        for i, c_out in enumerate(channels):
            if i > 0 and pool != "none" and size >= 4:
                layers.append(pools[pool](2))
                size //= 2
            layers += [
                Conv(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=not batch_norm),
                Norm(c_out) if batch_norm else nn.Identity(),
                make_activation(activation),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1) if two_d else nn.AdaptiveAvgPool1d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.head(self.dropout(x))
