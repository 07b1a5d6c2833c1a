"""The linear baseline: one affine layer over the flattened input."""

from __future__ import annotations

import math

import torch
from torch import nn


class LinearModel(nn.Module):
    """A single `nn.Linear` over the flattened input.

    With cross-entropy this is multinomial logistic regression (`model=logreg`);
    with a regression loss it is linear regression onto `num_classes` outputs.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.head = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.flatten(1))
