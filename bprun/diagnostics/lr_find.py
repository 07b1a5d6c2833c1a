"""`task=lr_find`: the learning-rate range test, with Lightning's semantics.

The configured model trains for `num_steps` updates with the learning rate
growing exponentially from `min_lr` to `max_lr` (Lightning's `_ExponentialLR`:
update k uses min_lr * (max_lr / min_lr) ** ((k + 1) / num_steps) for k >= 1 and
min_lr for k = 0). After each update the loss is smoothed with an exponential
moving average and its bias correction:

    avg = beta * avg + (1 - beta) * loss
    smoothed = avg / (1 - beta ** n)                  n = losses averaged so far

so the first point is the first loss and the curve starts where the untrained
model is (about ln 10 = 2.3 for 10 classes). Lightning's `_LRCallback` divides
by 1 - beta ** (n + 1), one power too many: its first points read about half
the loss and rise over the first ~50 updates whatever the learning rate does.
The sweep stops once `smoothed > early_stop_threshold * best`
(after the first update), or at a non-finite loss. The suggestion is Lightning's: the
learning rate at the steepest descent (the most negative `np.gradient`) of the
smoothed losses, leaving out the first `skip_begin` and the last `skip_end`.

The sweep trains the model in place and then restores its weights, the
optimizer's state, and the RNG state: nothing it learned survives, and it
writes no checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from bprun.diagnostics.settings import LrFindSettings
from bprun.engine.callbacks import Callback, implemented
from bprun.engine.settings import Checkpointing, EarlyStopping, GradWatch
from bprun.engine.trainer import Trainer

log = logging.getLogger("bprun")


@dataclass
class LrFindResult:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # smoothed
    suggestion: float | None = None
    index: int | None = None  # of the suggestion in lrs / losses
    stopped_early: bool = False


class _Stop(Exception):
    """Ends the sweep from inside the training loop."""


class _Sweep(Callback):
    """Trainer callback: sets each update's learning rate, records the smoothed loss."""

    def __init__(self, s: LrFindSettings, result: LrFindResult):
        self.s, self.result = s, result
        self.avg, self.best, self.seen = 0.0, 0.0, []

    def lr(self, k: int) -> float:
        s = self.s
        return s.min_lr if k == 0 else s.min_lr * (s.max_lr / s.min_lr) ** ((k + 1) / s.num_steps)

    def _set_lr(self, trainer, lr: float) -> None:
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr

    def record_loss(self, module, args, output) -> None:
        if torch.is_grad_enabled():
            self.seen.append(output.detach())

    def on_fit_start(self, trainer, train_loader) -> None:
        self._set_lr(trainer, self.lr(0))

    def on_update_end(self, trainer) -> None:
        s, r = self.s, self.result
        step = trainer.update  # updates done, this one included: the losses averaged
        loss = float(torch.stack(self.seen).float().mean()) if self.seen else math.nan
        self.seen.clear()
        self.avg = s.beta * self.avg + (1 - s.beta) * loss
        smoothed = self.avg / (1 - s.beta**step)
        r.lrs.append(trainer.optimizer.param_groups[0]["lr"])
        r.losses.append(smoothed)
        diverged = (
            s.early_stop_threshold is not None
            and step > 1
            and smoothed > s.early_stop_threshold * self.best
        )
        if smoothed < self.best or step == 1:
            self.best = smoothed
        if diverged or not math.isfinite(loss):
            r.stopped_early = True
            raise _Stop
        if step < s.num_steps:
            self._set_lr(trainer, self.lr(step))


def suggest(
    lrs: list[float], losses: list[float], skip_begin: int = 10, skip_end: int = 1
) -> tuple[float | None, int | None]:
    """Lightning's `_LRFinder.suggestion`: (lr, index) at the steepest negative gradient of the
    smoothed loss, or (None, None) when fewer than two finite points remain."""
    window = np.array(losses[skip_begin:-skip_end] if skip_end else losses[skip_begin:])
    window = window[np.isfinite(window)]
    if len(window) < 2:
        return None, None
    index = int(np.gradient(window).argmin()) + skip_begin
    return lrs[index], index


def find_lr(trainer: Trainer, train_loader, settings: LrFindSettings | None = None) -> LrFindResult:
    """Run the range test on `trainer`'s model and optimizer over `train_loader`, then put the
    model, the optimizer and the RNG back as they were."""
    s = settings or LrFindSettings()
    result = LrFindResult()
    sweep = _Sweep(s, result)
    model_state = copy.deepcopy(trainer.module.state_dict())
    optim_state = copy.deepcopy(trainer.optimizer.state_dict())
    rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if trainer.device.type == "cuda" else None
    loss_fn = trainer.loss_fn
    if not isinstance(loss_fn, nn.Module):  # a plain function: wrap it to hook its output
        loss_fn = _LossModule(loss_fn)
    settings_ = dataclasses.replace(
        trainer.settings,
        max_epochs=10**9,
        max_updates=s.num_steps,
        log_every_n_updates=10**9,
        progress=False,
        resume=None,
        fast_dev_run=False,
        checkpoint=Checkpointing(enabled=False),
        early_stopping=EarlyStopping(),
        log_grad_norms=False,
        grad_flow_every_n_epochs=None,
        dead_units=False,
        grad_watch=GradWatch(),
    )
    sweeper = Trainer(
        settings_,
        trainer.module,
        loss_fn,
        trainer.optimizer,
        device=trainer.device,
        problem=trainer.problem,
        # The batches are the training's: mixed (Mixup, CutMix) or attacked as it would be.
        callbacks=[*(h.__self__ for h in implemented(trainer.callbacks, "on_train_batch")), sweep],
    )
    handle = loss_fn.register_forward_hook(sweep.record_loss)
    quiet = _Quiet()
    log.addFilter(quiet)
    try:
        with contextlib.suppress(_Stop):
            sweeper.fit(train_loader, None)
    finally:
        log.removeFilter(quiet)
        handle.remove()
        trainer.module.load_state_dict(model_state)
        trainer.optimizer.load_state_dict(optim_state)
        torch.random.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    result.suggestion, result.index = suggest(result.lrs, result.losses, s.skip_begin, s.skip_end)
    return result


class _LossModule(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, output, target):
        return self.fn(output, target)


class _Quiet:
    """Drops the inner trainer's per-epoch lines: a sweep's epoch means nothing."""

    def filter(self, record) -> bool:
        return record.levelno > logging.INFO or record.module != "trainer"
