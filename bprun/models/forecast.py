"""The linear forecasting baseline: one linear map from the window to the horizon (DLinear).

With `decompose=true` the target's window is split into a trend (a moving average) and a
remainder, each mapped to the horizon by its own linear layer and the two added, as in
Zeng et al., "Are Transformers Effective for Time Series Forecasting?" (2023). Any other
input (covariates, and the horizon's known covariates) adds one linear map of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearForecaster(nn.Module):
    """Input (channels, steps) with the target in channel 0 and its window in the first
    `window` steps (`bprun.data.series`); output the `num_classes` horizon values."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        window: int | None = None,
        decompose: bool = True,
        kernel: int = 25,
    ):
        super().__init__()
        if len(input_shape) != 2:
            raise ValueError(
                f"model=linear_forecast takes series windows (channels, steps), got "
                f"{tuple(input_shape)}: use model=mlp for vectors, model=cnn for images"
            )
        channels, steps = input_shape
        self.window = window or steps
        self.kernel = max(1, min(kernel, self.window)) // 2 * 2 + 1  # odd, within the window
        self.decompose = decompose
        self.remainder = nn.Linear(self.window, num_classes)
        self.trend = nn.Linear(self.window, num_classes) if decompose else None
        rest = channels * steps - self.window
        self.covariates = nn.Linear(rest, num_classes) if rest else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        series = x[:, 0, : self.window]
        if self.trend is None:
            out = self.remainder(series)
        else:
            pad = self.kernel // 2  # the ends repeat, so the average keeps the window's length
            padded = F.pad(series.unsqueeze(1), (pad, pad), mode="replicate")
            trend = F.avg_pool1d(padded, self.kernel, stride=1).squeeze(1)
            out = self.trend(trend) + self.remainder(series - trend)
        if self.covariates is not None:
            rest = torch.cat([x[:, 0, self.window :], x[:, 1:].flatten(1)], dim=1)
            out = out + self.covariates(rest)
        return out


class SeriesEmbedding(nn.Module):
    """A global forecaster over many series: the input's last channel holds each example's
    series index (`bprun.data.series`, with an id embedding), swapped here for a learned
    `dim`-wide vector repeated at every step, the static categorical of pytorch-forecasting
    and NeuralForecast. `model` is built for the input with those `dim` channels in place of
    the index, so any forecaster (mlp, gru, lstm, transformer, linear_forecast) takes it."""

    def __init__(self, model: nn.Module, count: int, dim: int):
        super().__init__()
        self.model = model
        self.embedding = nn.Embedding(count, dim)

    @staticmethod
    def inner_shape(input_shape: tuple[int, ...], dim: int) -> tuple[int, ...]:
        channels, steps = input_shape
        return (channels - 1 + dim, steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x[:, -1, 0].round().long()
        vectors = self.embedding(ids).unsqueeze(-1).expand(-1, -1, x.shape[-1])
        return self.model(torch.cat([x[:, :-1], vectors.to(x.dtype)], dim=1))
