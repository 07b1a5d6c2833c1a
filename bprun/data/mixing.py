"""Mixup and CutMix: training batches mixed pairwise, with soft labels.

`dataset.augment.mixup=<alpha>` blends each image with its neighbour in the
(shuffled) batch by a weight drawn from Beta(alpha, alpha) (Zhang et al. 2018);
`dataset.augment.cutmix=<alpha>` pastes a box of the neighbour in instead, of
an area share drawn the same way (Yun et al. 2019). The labels are mixed by
the same weight, so the targets become class probabilities (N, classes) that
sum to 1, and the loss is cross-entropy against them. Both set: each batch
takes one of the two at random (timm's choice); 0 is off.

torchvision.transforms.v2's MixUp and CutMix do the work, on the training
device, after the batch is normalised (a blend of normalised images is the
normalised blend). Their draws (the weight, the box, the choice) come from
torch's global CPU generator, whose state checkpoints hold, so a resumed run
mixes exactly as an uninterrupted one. Validation and test batches are not mixed.

Accuracy against soft targets, where anything computes one, counts the argmax
of the target as the label (`bprun.engine.metrics.Metrics`).
"""

from __future__ import annotations

from torch import nn

from bprun.errors import BprunError

MIX_KEYS = ("mixup", "cutmix")


class MixBatches:
    """A trainer callback (the `on_train_batch` hook) mixing each training batch."""

    def __init__(self, mixup: float, cutmix: float, num_classes: int):
        from torchvision.transforms import v2

        self.mixup, self.cutmix = mixup, cutmix
        parts = []
        if mixup:
            parts.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
        if cutmix:
            parts.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
        self.transform = parts[0] if len(parts) == 1 else v2.RandomChoice(parts)

    def on_train_batch(self, trainer, x, y):
        return self.transform(x, y)

    def __repr__(self) -> str:
        return f"MixBatches(mixup={self.mixup}, cutmix={self.cutmix})"


def mixing_callbacks(augment: dict, dataset, loss: nn.Module) -> list[MixBatches]:
    """The mixing callback `dataset.augment` asks for (none when mixup and cutmix are 0),
    after checking that the dataset and the loss can take it."""
    on = [k for k in MIX_KEYS if augment.get(k)]
    if not on:
        return []
    keys = " and ".join(f"dataset.augment.{k}" for k in on)
    off = " and ".join(f"dataset.augment.{k}=0" for k in on)
    if dataset.problem != "classification":
        raise BprunError(
            f"{keys} mix class labels, but this dataset poses a {dataset.problem} problem: set {off}"
        )
    if len(dataset.input_shape) != 3:
        raise BprunError(
            f"{keys} mix images (N, C, H, W), but this dataset's inputs are "
            f"{tuple(dataset.input_shape)}: set {off}"
        )
    if not isinstance(loss, (nn.CrossEntropyLoss, nn.BCEWithLogitsLoss)):
        raise BprunError(
            f"{keys} make soft targets (class probabilities), which {type(loss).__name__} "
            "cannot take: use loss=cross_entropy (or auto) or bce_with_logits"
        )
    return [MixBatches(augment.get("mixup", 0.0), augment.get("cutmix", 0.0), dataset.num_classes)]
