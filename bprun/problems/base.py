"""The problem interface, and the evaluation that accumulates its metrics.

A subclass sets `kind`, `loss_kind` and `names`, and implements `output_size`,
`default_loss`, `metrics` (torchmetrics objects by name) and `inputs` (what those
metrics are updated with); the rest has defaults that most problems keep.
"""

from __future__ import annotations

import difflib
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from bprun.errors import BprunError

log = logging.getLogger("bprun")


class Problem:
    """What a model predicts. Subclasses: Classification, Multilabel, Regression, ...

    `metrics`: the subset of `names` to compute (None: `default_metrics`); `loss` is always
    reported. `classes`: names of the outputs, for tables and plots.
    """

    kind: ClassVar[str] = ""
    # The losses that fit, as losses declare it (`bprun.losses`): classification (class labels)
    # or regression (float targets shaped like the output); None: any loss given.
    loss_kind: ClassVar[str | None] = None
    names: ClassVar[tuple[str, ...]] = ("loss",)
    # What the loop monitors unless trainer.monitor says otherwise.
    monitor: ClassVar[str] = "val/loss"
    mode: ClassVar[str] = "min"
    requires_model_arguments: ClassVar[bool] = False

    def __init__(
        self,
        num_classes: int = 0,
        metrics: Sequence[str] | None = None,
        classes: Sequence[str] | None = None,
    ):
        self.num_classes = int(num_classes)
        self.classes = list(classes) if classes else None
        available = self.available_metrics()
        if metrics is None:
            self.selected = [m for m in self.default_metrics() if m in available]
        else:
            self.selected = [m for m in metrics if m != "loss"]
            for m in self.selected:
                if m not in available:
                    near = difflib.get_close_matches(m, available, n=1)
                    hint = f"did you mean {near[0]}? " if near else ""
                    raise BprunError(
                        f"metrics=[...] names '{m}', which the {self.describe_kind()} problem "
                        f"does not report: {hint}(choose from {', '.join(available)})"
                    )

    @classmethod
    def from_data(cls, dataset, **settings) -> Problem:
        """The problem for a `bprun.data.Dataset`, with the settings of the `problem` node."""
        return cls(num_classes=dataset.num_classes, classes=dataset.classes, **settings)

    # ------------------------------------------------------------------ what the model gives
    @property
    def output_size(self) -> int:
        """The width of the model's last layer."""
        return self.num_classes

    def models_hint(self) -> str:
        """The models that fit this problem, for the error when a model does not take the
        `model_arguments` this problem requires."""
        return "another model"

    def default_loss(self) -> nn.Module:
        raise NotImplementedError

    def use_loss(self, node) -> None:
        """Read what the loss node says about the outputs, before the model is built (a
        forecaster's quantiles); nothing by default."""

    def model_arguments(self) -> dict:
        """Keyword arguments a model builder gets when its signature takes them (a forecaster's
        `window`, a recommender's `num_users`), beside `input_shape` and `num_classes`; with
        `requires_model_arguments`, a model that does not take them is an error."""
        return {}

    def criterion(self, loss: nn.Module) -> nn.Module:
        """What the loop calls as `criterion(model(x), y)`: the loss itself unless the problem
        reshapes outputs or targets first (a language model flattens its positions)."""
        return loss

    def check_loss(self, loss: nn.Module) -> None:
        """A loss made for other targets fails before training, naming the ones that fit."""
        from bprun.losses import loss_kind

        kind = loss_kind(loss)
        if kind is None or self.loss_kind is None or kind == self.loss_kind:
            return
        fits = {
            "regression": "loss=mse, l1 or huber",
            "classification": "loss=cross_entropy, nll or focal",
        }.get(self.loss_kind, "loss=auto")
        raise BprunError(
            f"the loss {type(loss).__name__} is for {kind}, but this is a {self.describe_kind()} "
            f"problem: use {fits} (or loss=auto, which follows the problem)"
        )

    def check_data(self, dataset) -> None:
        """Targets that this problem cannot score: one line naming the fix."""

    def decode(self, out: torch.Tensor) -> torch.Tensor:
        """Predictions from a batch of outputs."""
        return out

    # ------------------------------------------------------------------ metrics
    def available_metrics(self) -> list[str]:
        """The names this problem reports for this data, `loss` aside."""
        return [n for n in self.names if n != "loss"]

    def default_metrics(self) -> list[str]:
        return self.available_metrics()

    def metric_names(self, prefix: str) -> list[str]:
        """What `evaluate` gives under `prefix`, known before any batch is seen."""
        return [f"{prefix}/{m}" for m in ("loss", *self.selected)]

    def metrics(self) -> dict[str, tuple]:
        """`name -> (torchmetrics object, input key)` for the selected metrics and what reports
        need; each object is updated with `inputs(out, y)[input key]`."""
        return {}

    def inputs(self, out: torch.Tensor, y: torch.Tensor) -> dict[str, tuple]:
        """`input key -> (predictions, targets)` as the metrics take them, made once a batch."""
        return {"out": (out, y)}

    def finish(self, values: dict[str, torch.Tensor], evaluation: Evaluation) -> dict[str, float]:
        """The computed metrics as floats, `loss` first: drop, derive or rename entries here."""
        return self.pick(values)

    def pick(self, values: dict, derived: dict | None = None) -> dict[str, float]:
        """`loss` and the selected metrics as floats, from the computed `values` or the
        `derived` ones; a metric neither holds (left out for this split) is skipped."""
        derived = derived or {}
        out = {"loss": float(values["loss"])}
        for name in self.selected:
            value = values.get(name, derived.get(name))
            if value is not None:
                out[name] = float(value)
        return out

    def evaluation(self, device: torch.device | str) -> Evaluation:
        return Evaluation(self, device)

    # ------------------------------------------------------------------ what a run says
    def describe_kind(self) -> str:
        return self.kind

    def describe(self) -> str:
        return f"problem {self.describe_kind()}; metrics {', '.join(['loss', *self.selected])}"

    def report(self, evaluation: Evaluation, folder: Path, prefix: str, tracker=None) -> None:
        """Write what this problem adds beside the metrics of a finished evaluation (a confusion
        matrix, a per-class table); nothing by default."""

    def callbacks(self, dataset, settings, run_dir) -> list:
        """Trainer callbacks this problem adds on the writing rank (a language model's text
        samples at each validation); none by default."""
        return []

    def warn_once(self, key: str, message: str) -> None:
        """A warning said once per run, not at every evaluation."""
        warned = self.__dict__.setdefault("_warned", set())
        if key not in warned:
            warned.add(key)
            log.warning(message)


class Evaluation:
    """One evaluation pass: the loss's weighted mean and the problem's metrics, accumulated on
    the device (no host read per batch) and read once by `compute`. Under DDP each rank updates
    with its own part of the data and torchmetrics gathers the states of all ranks in
    `compute`, so every rank gets the metrics of the whole split."""

    def __init__(self, problem: Problem, device: torch.device | str):
        from bprun.problems._torchmetrics import load

        MeanMetric = load().MeanMetric

        self.problem, self.device = problem, torch.device(device)
        self.loss = MeanMetric().to(self.device)
        self.metrics = {
            name: (metric.to(self.device), key) for name, (metric, key) in problem.metrics().items()
        }
        self.count = 0
        self.prefix = ""

    def update(self, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> None:
        n = y.shape[0]
        self.loss.update(loss.detach().float(), n)
        if self.metrics:
            inputs = self.problem.inputs(out.detach(), y)
            for metric, key in self.metrics.values():
                metric.update(*inputs[key])
        self.count += n

    def compute(self, prefix: str) -> dict[str, float]:
        """`<prefix>/<name>` -> value, the same on every rank; {} when nothing was evaluated."""
        if self._global_count() == 0:
            return {}
        self.prefix = prefix
        with warnings.catch_warnings():  # an undefined metric is the problem's to say, once
            warnings.simplefilter("ignore", UserWarning)
            values = {"loss": self.loss.compute()}
            values.update({name: metric.compute() for name, (metric, _) in self.metrics.items()})
        self.values = values
        return {f"{prefix}/{k}": v for k, v in self.problem.finish(values, self).items()}

    def _global_count(self) -> int:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self.count
        t = torch.tensor([self.count], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return int(t.item())
