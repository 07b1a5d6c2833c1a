"""Adversarial examples (FGSM, PGD) for training on them and for evaluating under attack.

FGSM (Goodfellow et al. 2015) takes one step of size `alpha` in the sign of the
loss's gradient with respect to the input; PGD (Madry et al. 2018) takes
`steps` of them from a random point of the eps-ball, projecting back onto the
ball after each. Images are attacked in pixel space: `eps` and `alpha` are
pixel units (8/255), turned into the normalised units the model sees by the
dataset's per-channel std, and every perturbed image stays within the pixel
range [0, 1], expressed in those units (`bprun.data.augment.pixel_bounds`).
Inputs without a known range (tables, signals) are not clamped.

The gradient is taken with `torch.autograd.grad` with respect to the input
alone, so the model's `.grad` fields are untouched, and the model runs in eval
mode during the attack: BatchNorm uses (and does not update) its running
statistics, and dropout is off. The random start draws from the global
generator of the input's device, whose state checkpoints hold, so a resumed
run draws the same starts.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch
from torch import nn

from bprun.engine.callbacks import Callback
from bprun.engine.settings import Adversarial, Attack
from bprun.errors import BprunError

log = logging.getLogger("bprun")

# (low, high, unit): the valid input range and one pixel unit, in the units the model sees,
# each a tensor that broadcasts over a batch (per channel for images).
Bounds = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def perturb(
    model: nn.Module,
    loss_fn: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: Attack,
    bounds: Bounds | None = None,
    autocast: Callable = contextlib.nullcontext,
) -> torch.Tensor:
    """Adversarial examples of the batch (x, y) against `model`: within `attack.eps` of `x`
    in every input value, and within `bounds` (low, high) when given."""
    if not x.is_floating_point():
        raise BprunError(
            f"adversarial attacks move the inputs along their gradient, but this dataset's inputs "
            f"are {x.dtype}: use attack=none and trainer.adversarial.method=none for it"
        )
    low, high, unit = bounds if bounds is not None else (None, None, 1.0)
    eps, alpha = attack.eps * unit, attack.step_size * unit
    clean = x.detach()
    adv = clean
    if attack.starts_at_random:
        adv = _clamp(clean + (2 * torch.rand_like(clean) - 1) * eps, low, high)
    was_training = model.training
    model.eval()  # BatchNorm keeps its running statistics; no dropout
    try:
        with torch.enable_grad():
            for _ in range(attack.num_steps):
                adv = adv.detach().requires_grad_(True)
                with autocast():
                    loss = loss_fn(model(adv), y)
                # The sum over the batch, not the mean: the same signs, larger gradients
                # (float16 activations underflow less).
                (grad,) = torch.autograd.grad(loss.float() * x.shape[0], adv)
                adv = adv.detach() + alpha * grad.sign()
                adv = torch.minimum(torch.maximum(adv, clean - eps), clean + eps)
                adv = _clamp(adv, low, high)
    finally:
        model.train(was_training)
    return adv.detach()


def _clamp(x: torch.Tensor, low, high) -> torch.Tensor:
    if low is None:
        return x
    return torch.minimum(torch.maximum(x, low), high)


def describe(attack: Attack) -> dict:
    """The attack as plain values (metrics.json, eval.json)."""
    return {
        "method": attack.method,
        "eps": attack.eps,
        "alpha": attack.step_size,
        "steps": attack.num_steps,
        "random_start": attack.starts_at_random,
    }


class AdversarialTraining(Callback):
    """Replaces the first `share` of each training batch (already shuffled) by adversarial
    examples of the current weights; the labels stay."""

    def __init__(self, settings: Adversarial, bounds: Bounds | None = None):
        self.attack, self.bounds = settings, bounds
        self.prefix = f"val_{settings.method}"
        # The problem's metrics under this prefix, each epoch: the trainer names them before
        # training, so that trainer.monitor=val_pgd/acc is checked then.
        self.validates_as = self.prefix if settings.validate_under_attack else None

    def on_fit_start(self, trainer, train_loader) -> None:
        a = describe(self.attack)
        unit = "pixel units" if self.bounds is not None else "input units"
        log.info(
            f"adversarial training: {a['method']} with eps={a['eps']:.4g} ({unit}), "
            f"{a['steps']} step(s) of {a['alpha']:.4g}, random start {a['random_start']}, "
            f"on {self.attack.share:.0%} of each batch"
        )

    def on_train_batch(self, trainer, x, y):
        n = round(self.attack.share * x.shape[0])
        if n == 0:
            return x, y
        # The plain module under DDP: the attack's backward must not start a gradient all-reduce.
        model = trainer.module if trainer.dist.enabled else trainer.model
        adv = perturb(
            model, trainer.loss_fn, x[:n], y[:n], self.attack, self.bounds,
            trainer.precision.autocast,
        )  # fmt: skip
        return (adv if n == x.shape[0] else torch.cat([adv, x[n:]])), y

    def on_validation(self, trainer, metrics: dict, val_loader) -> None:
        if self.attack.validate_under_attack and val_loader is not None:
            perturb = attacked(trainer, self.attack, self.bounds)
            metrics.update(trainer.evaluate(val_loader, self.prefix, perturb))

    def on_summary(self, trainer, summary: dict) -> None:
        summary["adversarial"] = {**describe(self.attack), "share": self.attack.share}


def adversarial_callbacks(settings: Adversarial, bounds: Bounds | None) -> list:
    """The adversarial-training callback the settings switch on (none for method=none)."""
    if settings.method == "none":
        return []
    return [AdversarialTraining(settings, bounds)]


def attacked(trainer, attack: Attack, bounds: Bounds | None) -> Callable:
    """`perturb` for `Trainer.evaluate`: each batch under `attack`, against the trainer's loss."""

    def run(model, x, y):
        return perturb(model, trainer.loss_fn, x, y, attack, bounds, trainer.precision.autocast)

    return run
