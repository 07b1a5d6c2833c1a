"""Single-label classification: multiclass, and binary with a decision threshold.

The model gives one logit per class (two for a binary problem, so that cross-entropy,
mixup and the class-probability tools work alike); targets are int64 class indices (N,),
or class probabilities (N, C) as mixup makes, which count as their argmax.

Metrics match scikit-learn's definitions on the same predictions:
- acc, top5 (more than 5 classes), auroc and average_precision (one-vs-rest, macro over the
  classes the split holds), ece (15 equal-width confidence bins), from torchmetrics;
- balanced_acc, f1_macro, precision_macro, recall_macro from the confusion matrix, with
  scikit-learn's label sets (balanced accuracy over the classes present in the targets, the
  macro averages over those present in targets or predictions);
- binary only: f1, precision and recall of the positive class (label 1) at `threshold`, and
  `best_threshold`, the one with the best F1 on the split.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from bprun.errors import BprunError
from bprun.problems import KINDS
from bprun.problems.base import Evaluation, Problem

log = logging.getLogger("bprun")

BINARY_ONLY = ("f1", "precision", "recall", "best_threshold")


class Classification(Problem):
    """`threshold`: the positive-class probability at or above which a binary prediction is
    positive; `auto` uses the threshold with the best validation F1 (`val/best_threshold`) for
    the test split and `task=eval`."""

    kind = "classification"
    loss_kind = "classification"
    names = KINDS["classification"][1]

    def __init__(self, num_classes: int = 0, metrics=None, classes=None, threshold=0.5):
        if num_classes < 2:
            raise BprunError(
                f"a classification problem needs at least 2 classes, the data has {num_classes}: "
                "check dataset.target, or use problem=regression for numeric targets"
            )
        self.auto_threshold = threshold == "auto"
        if not self.auto_threshold:
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
                raise BprunError(
                    f"problem.threshold must be a number in (0, 1) or auto, got {threshold!r}"
                )
            if not 0 < threshold < 1:
                raise BprunError(
                    f"problem.threshold={threshold} is outside (0, 1): give a probability "
                    "such as 0.5, or problem.threshold=auto for the best validation F1"
                )
        self.threshold = 0.5 if self.auto_threshold else float(threshold)
        super().__init__(num_classes, metrics, classes)
        if self.auto_threshold and not self.binary:
            raise BprunError(
                f"problem.threshold=auto applies to binary problems, this one has {num_classes} "
                "classes: drop problem.threshold"
            )

    @property
    def binary(self) -> bool:
        return self.num_classes == 2

    def describe_kind(self) -> str:
        if self.binary:
            return f"binary classification (threshold {self.threshold:g})"
        return f"classification ({self.num_classes} classes)"

    def available_metrics(self) -> list[str]:
        names = [n for n in self.names if n != "loss"]
        if not self.binary:
            names = [n for n in names if n not in BINARY_ONLY]
        if self.num_classes <= 5:
            names.remove("top5")
        return names

    def default_loss(self) -> nn.Module:
        from bprun.losses import CrossEntropyLoss

        return CrossEntropyLoss()

    def check_data(self, dataset) -> None:
        y = dataset.y_train
        if y.is_floating_point() and not (y.dim() == 2 and y.shape[1] == self.num_classes):
            raise BprunError(
                f"problem=classification needs class labels, but the data gives {y.dtype} "
                f"targets of shape {tuple(y.shape)}: use problem=regression (or problem=auto)"
            )

    def set_threshold(self, value: float) -> None:
        """The decision threshold from now on (problem.threshold=auto, once it is known)."""
        self.threshold = float(value)

    def decode(self, out: torch.Tensor) -> torch.Tensor:
        if self.binary:
            return (out.float().softmax(-1)[:, 1] >= self.threshold).long()
        return out.argmax(-1)

    # ------------------------------------------------------------------ metrics
    def metrics(self) -> dict[str, tuple]:
        from bprun.problems._torchmetrics import load

        tm = load().classification

        c, t, chosen = self.num_classes, self.threshold, set(self.selected)
        fast = {"validate_args": False}
        m: dict[str, tuple] = {}
        if self.binary:
            m["confusion"] = (tm.BinaryConfusionMatrix(threshold=t, **fast), "positive")
            if "acc" in chosen:
                m["acc"] = (tm.BinaryAccuracy(threshold=t, **fast), "positive")
            for name, cls in (
                ("f1", tm.BinaryF1Score),
                ("precision", tm.BinaryPrecision),
                ("recall", tm.BinaryRecall),
            ):
                if name in chosen:
                    m[name] = (cls(threshold=t, **fast), "positive")
            if "auroc" in chosen:
                m["auroc"] = (tm.BinaryAUROC(**fast), "positive")
            if "average_precision" in chosen:
                m["average_precision"] = (tm.BinaryAveragePrecision(**fast), "positive")
            if "best_threshold" in chosen:
                m["pr_curve"] = (tm.BinaryPrecisionRecallCurve(**fast), "positive")
        else:
            m["confusion"] = (tm.MulticlassConfusionMatrix(c, **fast), "labels")
            if "acc" in chosen:
                m["acc"] = (tm.MulticlassAccuracy(c, average="micro", **fast), "probs")
            if "top5" in chosen:
                m["top5"] = (tm.MulticlassAccuracy(c, top_k=5, average="micro", **fast), "probs")
            if "auroc" in chosen:
                m["auroc"] = (tm.MulticlassAUROC(c, average="none", **fast), "probs")
            if "average_precision" in chosen:
                ap = tm.MulticlassAveragePrecision(c, average="none", **fast)
                m["average_precision"] = (ap, "probs")
        if "ece" in chosen:
            m["ece"] = (tm.MulticlassCalibrationError(c, n_bins=15, norm="l1", **fast), "probs")
        return m

    def inputs(self, out: torch.Tensor, y: torch.Tensor) -> dict[str, tuple]:
        if y.is_floating_point() and y.dim() == 2:  # class probabilities (mixup): their argmax
            y = y.argmax(1)
        probs = out.float().softmax(-1)
        inputs = {"probs": (probs, y)}
        if self.binary:
            inputs["positive"] = (probs[:, 1], y)
        else:
            inputs["labels"] = (probs.argmax(-1), y)
        return inputs

    def finish(self, values: dict, evaluation: Evaluation) -> dict[str, float]:
        cm = values["confusion"].double()  # rows: targets, columns: predictions
        support, predicted, tp = cm.sum(1), cm.sum(0), cm.diagonal()
        in_targets = support > 0
        labels = in_targets | (predicted > 0)
        precision = tp / predicted.clamp(min=1)
        recall = tp / support.clamp(min=1)
        f1 = 2 * tp / (support + predicted).clamp(min=1)
        derived = {
            "balanced_acc": recall[in_targets].mean(),
            "f1_macro": f1[labels].mean(),
            "precision_macro": precision[labels].mean(),
            "recall_macro": recall[labels].mean(),
        }
        split = evaluation.prefix
        for name in ("auroc", "average_precision"):
            if name not in values:
                continue
            if int(in_targets.sum()) < 2:
                self.warn_once(
                    f"{split}/{name}",
                    f"the {split} split holds one class only: {name} is left out of its metrics",
                )
                values.pop(name)
            elif not self.binary:  # one-vs-rest, over the classes the split holds
                values[name] = values[name][in_targets].mean()
        if "pr_curve" in values:
            precision_c, recall_c, thresholds = values.pop("pr_curve")
            if thresholds.numel() and int(in_targets.sum()) == 2:
                p, r = precision_c[:-1].double(), recall_c[:-1].double()
                scores = 2 * p * r / (p + r).clamp(min=1e-12)
                derived["best_threshold"] = thresholds[int(scores.argmax())]
        return self.pick(values, derived)

    # ------------------------------------------------------------------ reports
    def report(self, evaluation: Evaluation, folder: Path, prefix: str, tracker=None) -> None:
        """`<prefix>_confusion_matrix.json` and `.png`, a TensorBoard image, and the per-class
        table (`<prefix>_per_class.json`, printed)."""
        from bprun.problems.report import write_class_report

        if "confusion" not in getattr(evaluation, "values", {}):
            return
        cm = evaluation.values["confusion"].long().cpu()
        names = self.classes or [str(i) for i in range(self.num_classes)]
        write_class_report(cm, names, folder, prefix, tracker)
