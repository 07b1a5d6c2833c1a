"""Multi-label classification: any number of labels per example, one sigmoid per label.

Targets are 0/1 floats (N, labels); the model gives one logit per label, and a label is
predicted where its probability is at least `threshold`. Metrics (scikit-learn's names):
- acc: the fraction of examples with every label right (scikit-learn's accuracy_score,
  subset accuracy), hamming_acc: the fraction of labels right;
- f1_macro, f1_micro, auroc and average_precision (macro over labels, torchmetrics);
- per label, F1 and AUROC in the report (`<prefix>_per_label.json`, printed).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bprun.errors import BprunError
from bprun.problems import KINDS
from bprun.problems.base import Evaluation, Problem


class Multilabel(Problem):
    kind = "multilabel"
    loss_kind = None  # bce_with_logits takes 0/1 targets shaped like the output
    names = KINDS["multilabel"][1]

    def __init__(self, num_classes: int = 0, metrics=None, classes=None, threshold=0.5):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise BprunError(f"problem.threshold must be a number in (0, 1), got {threshold!r}")
        if not 0 < threshold < 1:
            raise BprunError(
                f"problem.threshold={threshold} is outside (0, 1): give a probability such as 0.5"
            )
        self.threshold = float(threshold)
        super().__init__(num_classes, metrics, classes)

    def describe_kind(self) -> str:
        return f"multilabel ({self.num_classes} labels, threshold {self.threshold:g})"

    def default_loss(self) -> nn.Module:
        from bprun.losses import BCEWithLogitsLoss

        return BCEWithLogitsLoss()

    def check_loss(self, loss: nn.Module) -> None:
        from bprun.losses import loss_kind

        if loss_kind(loss) is not None:
            raise BprunError(
                f"the loss {type(loss).__name__} scores one class or value per output, but a "
                "multilabel problem scores each label on its own: use loss=bce_with_logits "
                "(or loss=auto)"
            )

    def check_data(self, dataset) -> None:
        y = dataset.y_train
        if y.dim() != 2:
            raise BprunError(
                f"problem=multilabel needs one 0/1 column per label, but the data gives one "
                f"{'class' if not y.is_floating_point() else 'value'} per example "
                f"({y.dtype} targets of shape {tuple(y.shape)}): use problem=classification "
                "(or problem=auto) for single-label data"
            )
        if not bool(((y == 0) | (y == 1)).all()):
            raise BprunError(
                "problem=multilabel needs 0/1 targets (one column per label), but the data's "
                "targets hold other values: use problem=regression for numeric targets"
            )

    def decode(self, out: torch.Tensor) -> torch.Tensor:
        return (out.float().sigmoid() >= self.threshold).long()

    def metrics(self) -> dict[str, tuple]:
        from bprun.problems._torchmetrics import load

        tm = load().classification

        n, t, chosen = self.num_classes, self.threshold, set(self.selected)
        fast = {"validate_args": False}
        m: dict[str, tuple] = {
            "f1_labels": (tm.MultilabelF1Score(n, threshold=t, average="none", **fast), "p"),
            "auroc_labels": (tm.MultilabelAUROC(n, average="none", **fast), "p"),
        }
        if "acc" in chosen:
            m["acc"] = (tm.MultilabelExactMatch(n, threshold=t, **fast), "p")
        if "hamming_acc" in chosen:
            m["hamming_acc"] = (tm.MultilabelAccuracy(n, threshold=t, average="micro", **fast), "p")
        if "f1_micro" in chosen:
            m["f1_micro"] = (tm.MultilabelF1Score(n, threshold=t, average="micro", **fast), "p")
        if "average_precision" in chosen:
            m["ap_labels"] = (tm.MultilabelAveragePrecision(n, average="none", **fast), "p")
        m["support"] = (LabelCounts(n), "p")
        return m

    def inputs(self, out: torch.Tensor, y: torch.Tensor) -> dict[str, tuple]:
        return {"p": (out.float().sigmoid(), y.long())}

    def finish(self, values: dict, evaluation: Evaluation) -> dict[str, float]:
        positives, count = values["support"]
        both = (positives > 0) & (positives < count)  # labels whose AUROC and AP are defined
        derived = {"f1_macro": values["f1_labels"].mean()}
        for name, key in (("auroc", "auroc_labels"), ("average_precision", "ap_labels")):
            if key not in values:
                continue
            if not bool(both.any()):
                self.warn_once(
                    f"{evaluation.prefix}/{name}",
                    f"the {evaluation.prefix} split holds one class of every label: {name} is "
                    "left out of its metrics",
                )
                continue
            derived[name] = values[key][both].mean()
        return self.pick(values, derived)

    def report(self, evaluation: Evaluation, folder: Path, prefix: str, tracker=None) -> None:
        import logging

        from bprun.io import write_json
        from bprun.problems.report import table

        values = getattr(evaluation, "values", None)
        if not values:
            return
        positives, _ = values["support"]
        names = self.classes or [str(i) for i in range(self.num_classes)]
        rows = [
            {
                "label": names[i],
                "f1": float(values["f1_labels"][i]),
                "auroc": float(values["auroc_labels"][i]),
                "support": int(positives[i]),
            }
            for i in range(self.num_classes)
        ]
        write_json(rows, Path(folder) / f"{prefix}_per_label.json")
        columns = ("label", "f1", "auroc", "support")
        logging.getLogger("bprun").info(table(rows, columns, f"{prefix} split, per label:"))


class LabelCounts:
    """(positives per label, examples): summed on the device, synced over ranks."""

    def __new__(cls, labels: int):
        from bprun.problems._torchmetrics import load

        Metric = load().Metric

        class _LabelCounts(Metric):
            full_state_update = False

            def __init__(self):
                super().__init__()
                self.add_state("positives", torch.zeros(labels), dist_reduce_fx="sum")
                self.add_state("count", torch.zeros(()), dist_reduce_fx="sum")

            def update(self, _preds, target):
                self.positives += target.sum(0)
                self.count += target.shape[0]

            def compute(self):
                return self.positives, self.count

        return _LabelCounts()
