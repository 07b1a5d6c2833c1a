"""Problems: what a model predicts, and how that is scored.

A problem says, for one kind of data:
- the model's output width (`output_size`) and its default loss (`loss=auto`);
- what a batch's targets look like, checked once against the data (`check_data`);
- how the loop turns a batch's outputs and targets into a loss (`criterion`);
- its metrics (torchmetrics, accumulated on the device, synced over ranks, read once per
  evaluation) and every name they may take, known before any data loads;
- how outputs decode into predictions (`decode`), and what `task=eval` and the end of training
  write beside the metrics (`report`: a confusion matrix, a per-class table).

The data source names its problem (`Dataset.problem`); `problem=<kind>` overrides it. A kind is
one module here and one line in `KINDS`: nothing else in bprun branches on it.

This module imports no torch: the command-line checks read `KINDS` before anything heavy loads.
"""

from __future__ import annotations

# kind -> (the class, as module:name; every metric it may report, without a prefix)
KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "classification": (
        "bprun.problems.classification:Classification",
        (
            "loss",
            "acc",
            "balanced_acc",
            "f1_macro",
            "precision_macro",
            "recall_macro",
            "auroc",
            "average_precision",
            "top5",
            "ece",
            # binary only: at problem.threshold, and the threshold with the best F1
            "f1",
            "precision",
            "recall",
            "best_threshold",
        ),
    ),
    "multilabel": (
        "bprun.problems.multilabel:Multilabel",
        ("loss", "acc", "hamming_acc", "f1_macro", "f1_micro", "auroc", "average_precision"),
    ),
    "regression": (
        "bprun.problems.regression:Regression",
        ("loss", "mae", "rmse", "r2", "mape"),
    ),
    # next-token prediction on token streams: nats per token, perplexity, bits per byte
    "lm": ("bprun.problems.lm:LanguageModel", ("loss", "ppl", "bpb")),
    "forecast": (
        "bprun.problems.forecast:Forecast",
        (
            "loss",
            *(p + m for p in ("", "naive_", "snaive_") for m in ("mae", "rmse", "smape", "mase")),
        ),
    ),
    # hr@k and ndcg@k at problem.k (any k: `@k` stands for a number in the names below)
    "ranking": (
        "bprun.problems.ranking:Ranking",
        ("loss", "hr@k", "ndcg@k", "mrr", "rmse", "mae"),
    ),
}


def is_known_metric(name: str, known) -> bool:
    """`name` is one of `known`, where `@k` in a known name stands for any whole number."""
    import re

    return name in known or any(
        "@k" in k and re.fullmatch(re.escape(k).replace("@k", r"@\d+"), name) for k in known
    )


def metric_vocabulary(kind: str | None = None) -> tuple[str, ...]:
    """Every metric name `kind` may report (all kinds' when None): for checks before data."""
    kinds = [kind] if kind in KINDS else list(KINDS)
    return tuple(dict.fromkeys(name for k in kinds for name in KINDS[k][1]))


def problem_class(kind: str):
    """The Problem subclass of `kind` (imports torch)."""
    import importlib

    module, name = KINDS[kind][0].split(":")
    return getattr(importlib.import_module(module), name)
