"""Forecasting: the next `horizon` values of a series from the window before them.

The model predicts the horizon in the series' scaled units (what the loss sees). The metrics
are in the original units: each target row (`bprun.data.series`) carries the horizon as it
was, the series' mean and std to unscale the prediction, and two baselines scored on the same
windows, the naive forecast (the last value, repeated) and the seasonal naive (the value one
season back). For the model and each baseline (prefixed naive_ and snaive_):
    mae    mean absolute error
    rmse   root mean squared error
    smape  symmetric mean absolute percentage error, 200 |e| / (|y| + |y^|), 0 where both are 0
           (0 to 200, as Darts computes it)
    mase   |e| over the series' mean absolute seasonal difference in its training span (the
           seasonal naive's in-sample error), averaged over every forecast value
A model whose test MASE is not below the seasonal naive's is said to be so.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from bprun.errors import BprunError
from bprun.problems import KINDS
from bprun.problems._torchmetrics import load
from bprun.problems.base import Evaluation, Problem

Metric = load().Metric

log = logging.getLogger("bprun")

# metric prefix -> (input key, what the report calls it)
FORECASTERS = {
    "": ("model", "model"),
    "naive_": ("naive", "naive"),
    "snaive_": ("snaive", "seasonal naive"),
}
SCORES = ("mae", "rmse", "smape", "mase")


class ForecastErrors(Metric):
    """Sums of absolute, squared, symmetric-percentage and scaled errors (synced over ranks)."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        for name in ("abs", "sq", "smape", "scaled", "count"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor, scale: torch.Tensor) -> None:
        pred, target = pred.double(), target.double()
        e = (pred - target).abs()
        denom = pred.abs() + target.abs()
        self.abs += e.sum()
        self.sq += (e * e).sum()
        self.smape += torch.where(denom > 0, 200 * e / denom.clamp(min=1e-300), 0).sum()
        self.scaled += (e / scale.double().view(-1, 1)).sum()
        self.count += e.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.count.clamp(min=1)
        return {
            "mae": self.abs / n,
            "rmse": (self.sq / n).sqrt(),
            "smape": self.smape / n,
            "mase": self.scaled / n,
        }


class _Horizon(nn.Module):
    """The loss on the scaled horizon: the first `horizon` columns of a target row."""

    def __init__(self, loss: nn.Module, horizon: int):
        super().__init__()
        self.loss, self.horizon = loss, horizon

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(out, y[:, : self.horizon])


class Forecast(Problem):
    kind = "forecast"
    loss_kind = "regression"
    names = KINDS["forecast"][1]

    def __init__(
        self,
        num_classes: int = 0,
        metrics=None,
        classes=None,
        window: int = 0,
        id_embedding: tuple[int, int] | None = None,
    ):
        self.quantiles: list[float] = []
        self._metrics_given = metrics
        super().__init__(num_classes, metrics, classes)
        self.horizon, self.window = self.num_classes, window
        # (series, width): the model embeds the series index the data's last channel holds
        self.id_embedding = id_embedding

    def use_loss(self, node) -> None:
        """`loss=quantile`: one horizon per quantile; the median (or the quantile nearest it)
        is the point forecast the metrics score, the outer two the interval."""
        node = node or {}
        if str(node.get("_target_", "")).endswith("QuantileLoss"):
            self.quantiles = [float(q) for q in node.get("quantiles") or (0.1, 0.5, 0.9)]
            if "coverage" not in self.selected and self._metrics_given is None:
                self.selected.append("coverage")

    @property
    def output_size(self) -> int:
        return self.horizon * max(1, len(self.quantiles))

    @property
    def point(self) -> int:
        """The output block of the point forecast."""
        if not self.quantiles:
            return 0
        return min(range(len(self.quantiles)), key=lambda i: abs(self.quantiles[i] - 0.5))

    def available_metrics(self) -> list[str]:
        return [n for n in self.names if n != "loss"]

    def default_metrics(self) -> list[str]:
        return [n for n in self.available_metrics() if n != "coverage"]

    def check_loss(self, loss: nn.Module) -> None:
        if getattr(loss, "task", None) == "quantile":
            return
        super().check_loss(loss)

    @classmethod
    def from_data(cls, dataset, **settings) -> Forecast:
        return cls(num_classes=dataset.num_classes, **cls.from_spec(dataset.state), **settings)

    @staticmethod
    def from_spec(spec: dict | None) -> dict:
        """The settings a series source's `state` fixes: its window and its id embedding."""
        spec = spec or {}
        dim = spec.get("id_embedding") or 0
        ids = (len(spec["ids"]), dim) if dim else None
        return {"window": spec.get("window", 0), "id_embedding": ids}

    def describe_kind(self) -> str:
        return f"forecast ({self.horizon} steps)"

    def default_loss(self) -> nn.Module:
        from bprun.losses import MSELoss

        return MSELoss()

    def criterion(self, loss: nn.Module) -> nn.Module:
        if getattr(loss, "task", None) == "quantile" and list(loss.quantiles) != self.quantiles:
            raise BprunError("loss.quantiles changed after the model was built")
        return _Horizon(loss, self.horizon)

    def model_arguments(self) -> dict:
        return {"window": self.window}

    def check_data(self, dataset) -> None:
        from bprun.data.series import target_width

        if dataset.y_train.ndim != 2 or dataset.y_train.shape[1] != target_width(self.horizon):
            raise BprunError(
                "problem=forecast scores the windows of dataset=series (they carry the baselines "
                "and the scaling): use dataset=series, or problem=regression for this data"
            )

    def metrics(self) -> dict[str, tuple]:
        MeanMetric = load().MeanMetric

        m = {f"{p}errors": (ForecastErrors(), key) for p, (key, _) in FORECASTERS.items()}
        if self.quantiles and "coverage" in self.selected:
            m["coverage"] = (MeanMetric(), "inside")
        return m

    def inputs(self, out: torch.Tensor, y: torch.Tensor) -> dict[str, tuple]:
        h = self.horizon
        mean, std, scale = y[:, -3:-2], y[:, -2:-1], y[:, -1]
        target = y[:, h : 2 * h]
        blocks = out.float().view(out.shape[0], -1, h) * std.unsqueeze(1) + mean.unsqueeze(1)
        inside = ((blocks[:, 0] <= target) & (target <= blocks[:, -1])).float()
        return {
            "model": (blocks[:, self.point], target, scale),
            "inside": (inside,),
            "naive": (y[:, 3 * h : 3 * h + 1].expand(-1, h), target, scale),
            "snaive": (y[:, 2 * h : 3 * h], target, scale),
        }

    def finish(self, values: dict, evaluation: Evaluation) -> dict[str, float]:
        flat = {"loss": float(values["loss"])}
        if "coverage" in values:
            flat["coverage"] = float(values["coverage"])
        for prefix in FORECASTERS:
            for name, v in values[f"{prefix}errors"].items():
                flat[prefix + name] = float(v)
        return {k: v for k, v in flat.items() if k in ("loss", *self.selected)}

    def report(self, evaluation: Evaluation, folder, prefix: str, tracker=None) -> None:
        """The model beside the baselines on the same windows, and a line if it loses."""
        rows = {
            label: {k: float(v) for k, v in evaluation.values[f"{p}errors"].items()}
            for p, (_, label) in FORECASTERS.items()
        }
        lines = [f"{prefix} split, forecasts of the same windows (original units):"]
        lines.append(f"{'':<16}" + "".join(f"{s:>11}" for s in SCORES))
        for label, r in rows.items():
            lines.append(f"{label:<16}" + "".join(f"{r[s]:>11.4f}" for s in SCORES))
        log.info("\n".join(lines))
        model, snaive = rows["model"]["mase"], rows["seasonal naive"]["mase"]
        if not model < snaive:
            log.warning(
                f"the model does not beat the seasonal naive forecast on the {prefix} split: "
                f"MASE {model:.4f} against {snaive:.4f}"
            )
