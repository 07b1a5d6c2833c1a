"""Loss functions for `conf/loss`: torch's losses, adapted to what bprun's models and data give.

Models output raw scores (logits) of shape (N, num_classes); classification
targets are int64 class indices (N,), regression targets float (N, outputs).
Each wrapper checks the target kind once per call (a dtype and shape
comparison, no device work) so that a loss paired with the wrong kind of
dataset fails with a message instead of a shape error deep in torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bprun.errors import BprunError


def _class_targets(name: str, out: torch.Tensor, target: torch.Tensor) -> None:
    if target.is_floating_point() or target.dim() != 1:
        raise BprunError(
            f"loss={name} needs class labels, but the dataset gives {target.dtype} targets of "
            f"shape {tuple(target.shape)} (a regression task): use loss=mse, l1 or huber"
        )


def _regression_targets(name: str, out: torch.Tensor, target: torch.Tensor) -> None:
    if not target.is_floating_point():
        raise BprunError(
            f"loss={name} needs float targets, but the dataset gives class labels "
            "(a classification task): use loss=cross_entropy, nll or bce_with_logits"
        )
    if target.shape != out.shape:
        raise BprunError(
            f"loss={name}: model output {tuple(out.shape)} and targets {tuple(target.shape)} "
            "differ in shape; the model's output width must be the dataset's num_classes"
        )


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """Softmax cross-entropy of logits and int64 class labels, or of class probabilities
    shaped like the output (the soft targets of mixup and cutmix)."""

    task = "classification"

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not (target.is_floating_point() and target.shape == out.shape):
            _class_targets("cross_entropy", out, target)
        return super().forward(out, target)


class NLLLoss(nn.NLLLoss):
    """Negative log-likelihood of logits: log_softmax, then torch's NLLLoss.

    The same value as cross_entropy; kept for configs and papers that name it.
    """

    task = "classification"

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _class_targets("nll", out, target)
        return super().forward(F.log_softmax(out, dim=1), target)


class BCEWithLogitsLoss(nn.BCEWithLogitsLoss):
    """One independent sigmoid per output. Class indices are one-hot encoded first;
    float targets shaped like the output (multi-label, or probabilities) are used as they are."""

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not target.is_floating_point():
            _class_targets("bce_with_logits", out, target)
            # scatter, not F.one_hot: one_hot reads the labels' max on the host (a sync)
            target = torch.zeros_like(out).scatter_(1, target.unsqueeze(1), 1.0)
        elif target.shape != out.shape:
            raise BprunError(
                f"loss=bce_with_logits: float targets {tuple(target.shape)} must have the "
                f"model output's shape {tuple(out.shape)}"
            )
        return super().forward(out, target)


class MSELoss(nn.MSELoss):
    """Mean squared error (regression)."""

    task = "regression"

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _regression_targets("mse", out, target)
        return super().forward(out, target)


class L1Loss(nn.L1Loss):
    """Mean absolute error (regression)."""

    task = "regression"

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _regression_targets("l1", out, target)
        return super().forward(out, target)


class HuberLoss(nn.HuberLoss):
    """Squared error below `delta`, absolute error above it: MSE that shrugs off outliers."""

    task = "regression"

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _regression_targets("huber", out, target)
        return super().forward(out, target)


class BPRLoss(nn.Module):
    """Bayesian personalised ranking: -log sigmoid(positive's score - each other candidate's),
    averaged; the scores are (N, candidates) and the target the positive's column."""

    task = "classification"

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _class_targets("bpr", out, target)
        if out.dim() != 2 or out.shape[1] < 2:
            raise BprunError(
                "loss=bpr ranks a positive above sampled negatives: it needs interaction data "
                "with dataset.negatives of at least 1 (dataset=interactions)"
            )
        positive = out.gather(1, target.view(-1, 1))
        others = torch.ones_like(out, dtype=torch.bool).scatter_(1, target.view(-1, 1), False)
        margin = positive - out
        return -F.logsigmoid(margin[others]).mean()


def auto(problem) -> nn.Module:
    """`loss=auto`: the problem's own loss (cross-entropy for classification, mean squared error
    for regression, ...: `Problem.default_loss`)."""
    return problem.default_loss()


for_task = auto  # the target name that configs saved by earlier versions hold

# torch's own losses, by the targets they take (bprun's wrappers say it in their `task`).
_TORCH_KINDS = {
    nn.CrossEntropyLoss: "classification",
    nn.NLLLoss: "classification",
    nn.MSELoss: "regression",
    nn.L1Loss: "regression",
    nn.HuberLoss: "regression",
    nn.SmoothL1Loss: "regression",
}


def loss_kind(loss: nn.Module) -> str | None:
    """classification (takes class labels), regression (float targets shaped like the output),
    or None (either: bce_with_logits, a user's own loss that does not say)."""
    kind = getattr(loss, "task", None)
    if kind is None:
        kind = next((k for cls, k in _TORCH_KINDS.items() if isinstance(loss, cls)), None)
    return kind
