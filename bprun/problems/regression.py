"""Regression: one or more real-valued outputs per example.

Targets are floats shaped like the output (N, outputs). Metrics, over all output elements,
as scikit-learn computes them with its default uniform average over outputs:
mae, rmse, r2 (the mean of each output's R^2), and mape where no target is 0 (a split
holding a zero target leaves it out, with a warning).
"""

from __future__ import annotations

import torch
from torch import nn

from bprun.errors import BprunError
from bprun.problems import KINDS
from bprun.problems.base import Evaluation, Problem


class Regression(Problem):
    kind = "regression"
    loss_kind = "regression"
    names = KINDS["regression"][1]

    def describe_kind(self) -> str:
        return "regression" + (f" ({self.num_classes} outputs)" if self.num_classes > 1 else "")

    def default_loss(self) -> nn.Module:
        from bprun.losses import MSELoss

        return MSELoss()

    def check_data(self, dataset) -> None:
        if not dataset.y_train.is_floating_point():
            raise BprunError(
                f"problem=regression needs numeric targets, but the data gives class labels "
                f"({dataset.y_train.dtype}): use problem=classification (or problem=auto)"
            )

    def metrics(self) -> dict[str, tuple]:
        from bprun.problems._torchmetrics import load

        tm = load()

        chosen, k = set(self.selected), max(self.num_classes, 1)
        m: dict[str, tuple] = {}
        if "mae" in chosen:
            m["mae"] = (tm.MeanAbsoluteError(), "flat")
        if "rmse" in chosen:
            m["rmse"] = (tm.MeanSquaredError(squared=False), "flat")
        if "r2" in chosen:
            m["r2"] = (tm.R2Score(multioutput="uniform_average"), "flat" if k == 1 else "rows")
        if "mape" in chosen:
            m["mape"] = (tm.MeanAbsolutePercentageError(), "flat")
            m["min_abs_target"] = (tm.MinMetric(), "abs_target")
        return m

    def inputs(self, out: torch.Tensor, y: torch.Tensor) -> dict[str, tuple]:
        out, y = out.float(), y.float().view_as(out)
        rows = (out.reshape(out.shape[0], -1), y.reshape(y.shape[0], -1))
        return {
            "flat": (out.reshape(-1), y.reshape(-1)),
            "rows": rows,
            "abs_target": (y.abs().amin(),),
        }

    def finish(self, values: dict, evaluation: Evaluation) -> dict[str, float]:
        if "mape" in values and float(values.pop("min_abs_target")) == 0.0:
            values.pop("mape")
            self.warn_once(
                f"{evaluation.prefix}/mape",
                f"the {evaluation.prefix} split has a target equal to 0: mape is left out of "
                "its metrics (a percentage of 0 is undefined)",
            )
        return self.pick(values)
