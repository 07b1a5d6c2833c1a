"""The hooks the Trainer calls, in the order a run meets them.

A callback is any object with some of these methods; subclassing `Callback`
documents the intent and supplies no-ops for the rest. The Trainer looks up
each hook once, when it is built, so a hook that no callback implements costs
nothing in the loop. Callbacks read the run's settings from `trainer.settings`
and log through `trainer.tracker` (None when the run has no folder).

    on_fit_start                before the first update of `fit` (also after a resume)
    on_train_batch              per micro-batch: after the loader's transform (uint8 -> float,
                                normalisation, crops and flips), before the forward pass; returns
                                the (x, y) to train on (mixup, adversarial examples)
    on_before_optimizer_step    per update: gradients are final (accumulated, unscaled, clipped)
    on_update_end               per update: after the step and zero_grad
    on_validation               per epoch: after its updates and validation; may add metrics
                                (e.g. val_ema/*) that monitor, early stopping and top-k read
    on_epoch_end                per epoch: validation metrics are in, before they are logged
    on_fit_end                  after the last epoch, before the test
    on_test_start               before the test split: the best state is loaded (model and
                                callbacks); a callback may put other weights in the model
    on_summary                  once at the end, success or not: add results to metrics.json

The per-update hooks run in the hot loop: keep them free of host-device
synchronisation, or do their work only every N updates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bprun.engine.trainer import Trainer


class Callback:
    def on_fit_start(self, trainer: Trainer, train_loader: Any) -> None:
        """`fit` starts (or continues from a checkpoint); `train_loader` is the training data."""

    def on_train_batch(self, trainer: Trainer, x: Any, y: Any) -> tuple[Any, Any]:
        """The batch the model trains on next; return it, or a replacement. Callbacks
        implementing this are chained in their order; validation and test never see it."""
        return x, y

    def on_before_optimizer_step(self, trainer: Trainer) -> None:
        """Gradients of this update are final; the optimizer steps right after."""

    def on_update_end(self, trainer: Trainer) -> None:
        """An update is done: `trainer.update` counts it; gradients are gone."""

    def on_validation(self, trainer: Trainer, metrics: dict, val_loader: Any) -> None:
        """The epoch's updates and validation are done (`val_loader` is None without a
        validation split); metrics added here can be monitored and ranked."""

    def on_epoch_end(self, trainer: Trainer, metrics: dict) -> None:
        """An epoch ended; `metrics` holds its train and validation values and may be extended."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """Training ended (limit reached or stopped early), before the test split runs."""

    def on_test_start(self, trainer: Trainer) -> None:
        """The test split is evaluated next, with the best state loaded into the model."""

    def on_summary(self, trainer: Trainer, summary: dict) -> None:
        """The run ends, completed or not: add this callback's results to `summary`,
        which becomes metrics.json."""


HOOKS = (
    "on_fit_start",
    "on_train_batch",
    "on_before_optimizer_step",
    "on_update_end",
    "on_validation",
    "on_epoch_end",
    "on_fit_end",
    "on_test_start",
    "on_summary",
)


def implemented(callbacks: list, hook: str) -> list:
    """The bound `hook` methods of the callbacks that override it."""
    found = []
    for cb in callbacks:
        method = getattr(cb, hook, None)
        base = getattr(Callback, hook)
        if method is not None and getattr(method, "__func__", None) is not base:
            found.append(method)
    return found
