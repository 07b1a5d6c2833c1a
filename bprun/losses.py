"""Loss functions for `conf/loss`: torch's losses, adapted to what bprun's models and data give.

Models output raw scores (logits) of shape (N, num_classes); classification
targets are int64 class indices (N,), regression targets float (N, outputs).
Each wrapper checks the target kind once per call (a dtype and shape
comparison, no device work) so that a loss paired with the wrong kind of
dataset fails with a message instead of a shape error deep in torch.

The classification losses take per-class weights (`loss.class_weights`,
resolved by `class_weights` below) as a registered buffer, so they move to the
training device with the loss.
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


def class_weights(spec, labels: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """`loss.class_weights` as a float tensor of `num_classes` weights.

    `balanced`: n_samples / (n_classes * count_c) over the training split's `labels`, as
    scikit-learn's compute_class_weight("balanced") gives, so every class carries the same
    total weight; a list: the weights as given, one per class in label order.
    """
    if isinstance(spec, str) and spec == "balanced":
        if labels is None or labels.is_floating_point() or labels.dim() != 1:
            raise BprunError(
                "loss.class_weights=balanced counts the training split's class labels, and this "
                "dataset has none (a regression task?): drop loss.class_weights"
            )
        counts = torch.bincount(labels.cpu().long(), minlength=num_classes)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            raise BprunError(
                f"loss.class_weights=balanced: class(es) {empty} have no training examples, so "
                "they have no balanced weight: give the weights as a list, "
                f"loss.class_weights=[w0, ..., w{num_classes - 1}]"
            )
        return len(labels) / (num_classes * counts.double())
    if isinstance(spec, (list, tuple)):
        try:
            weights = torch.tensor([float(w) for w in spec], dtype=torch.float64)
        except (TypeError, ValueError):
            weights = None
        if weights is not None and len(weights) != num_classes:
            raise BprunError(
                f"loss.class_weights has {len(weights)} weights, but the dataset has "
                f"{num_classes} classes: give one per class, in label order "
                "(or loss.class_weights=balanced)"
            )
        if weights is not None and bool((weights >= 0).all()) and float(weights.sum()) > 0:
            return weights
    raise BprunError(
        f"loss.class_weights must be balanced or a list of non-negative numbers, one per "
        f"class (e.g. [1.0, 5.0]), got {spec!r}"
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
    float targets shaped like the output (multi-label, or probabilities) are used as they are.

    `weight` (per class): with class labels, each example's row is weighted by its class's
    weight, as class weights mean elsewhere; with float targets, each output column by its
    own (torch's per-element weight)."""

    def __init__(self, weight: torch.Tensor | None = None, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("class_weight", weight)

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not target.is_floating_point():
            _class_targets("bce_with_logits", out, target)
            rows = None if self.class_weight is None else self.class_weight[target].unsqueeze(1)
            # scatter, not F.one_hot: one_hot reads the labels' max on the host (a sync)
            target = torch.zeros_like(out).scatter_(1, target.unsqueeze(1), 1.0)
            return F.binary_cross_entropy_with_logits(
                out, target, rows, pos_weight=self.pos_weight, reduction=self.reduction
            )
        elif target.shape != out.shape:
            raise BprunError(
                f"loss=bce_with_logits: float targets {tuple(target.shape)} must have the "
                f"model output's shape {tuple(out.shape)}"
            )
        return F.binary_cross_entropy_with_logits(
            out, target, self.class_weight, pos_weight=self.pos_weight, reduction=self.reduction
        )


class FocalLoss(nn.Module):
    """Multiclass focal loss on logits (Lin et al. 2017): cross-entropy with each example's
    term scaled by (1 - p_t) ** gamma, p_t the softmax probability of its true class, so
    examples the model already gets right count less and the hard (often rare) ones more.

        loss = sum_i w[y_i] * (1 - p_i) ** gamma * -log p_i  /  sum_i w[y_i]

    `weight`: per-class weights, the paper's alpha (1 each when None). The normalisation
    is torch's weighted cross-entropy's, so gamma=0 gives `CrossEntropyLoss(weight)`
    exactly. Float targets shaped like the output (mixup's soft labels) weight each class's
    term by its probability, averaged over the batch.
    """

    task = "classification"

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None):
        super().__init__()
        if not gamma >= 0:
            raise BprunError(f"loss.gamma must be >= 0 (0 is cross-entropy), got {gamma}")
        self.gamma = float(gamma)
        self.register_buffer("weight", weight)

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(out.float(), dim=1)
        if target.is_floating_point() and target.shape == out.shape:  # soft labels
            terms = -target * (1 - log_p.exp()).pow(self.gamma) * log_p
            if self.weight is not None:
                terms = terms * self.weight
            return terms.sum(1).mean()
        _class_targets("focal", out, target)
        log_pt = log_p.gather(1, target.unsqueeze(1)).squeeze(1)
        terms = -(1 - log_pt.exp()).pow(self.gamma) * log_pt
        if self.weight is None:
            return terms.mean()
        w = self.weight[target]
        return (w * terms).sum() / w.sum()


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


class QuantileLoss(nn.Module):
    """Pinball loss of one output per quantile: probabilistic forecasts (problem=forecast).

    The output holds `len(quantiles)` blocks of the target's width, in the order given; each
    block is scored with max(q e, (q - 1) e), e = target - prediction, and the mean taken.
    """

    task = "quantile"

    def __init__(self, quantiles: list[float] = (0.1, 0.5, 0.9)):
        super().__init__()
        qs = [float(q) for q in quantiles]
        if not qs or any(not 0.0 < q < 1.0 for q in qs) or sorted(set(qs)) != qs:
            raise BprunError(
                f"loss.quantiles must be increasing values in (0, 1), e.g. [0.1,0.5,0.9]; got {qs}"
            )
        self.quantiles = qs
        self.register_buffer("q", torch.tensor(qs).view(1, -1, 1), persistent=False)

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not target.is_floating_point() or out.shape[1] != len(self.quantiles) * target.shape[1]:
            raise BprunError(
                f"loss=quantile: model output {tuple(out.shape)} is not {len(self.quantiles)} "
                f"quantiles of targets {tuple(target.shape)}: use it with problem=forecast"
            )
        e = target.unsqueeze(1) - out.view(out.shape[0], len(self.quantiles), -1)
        return torch.maximum(self.q * e, (self.q - 1) * e).mean()


def auto(problem, weight: torch.Tensor | None = None) -> nn.Module:
    """`loss=auto`: the problem's own loss (cross-entropy for classification, mean squared error
    for regression, ...: `Problem.default_loss`), with `weight` per class if given."""
    loss = problem.default_loss()
    if weight is None:
        return loss
    if problem.loss_kind != "classification":
        raise BprunError(
            f"loss.class_weights weights classes, but this is a {problem.describe_kind()} "
            "problem: drop loss.class_weights"
        )
    return type(loss)(weight=weight)


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
