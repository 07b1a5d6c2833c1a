"""The training loop: plain autograd, with every extra paid for only when switched on.

The Trainer takes objects (model, loss, optimizer, scheduler, loaders) and a
`TrainerSettings`; it knows nothing about Hydra or YAML.

Under data parallelism (`dist`, a DistContext from a launcher that started the
process group) the model is wrapped in DistributedDataParallel, loaders are
sharded by the caller, rank 0 alone writes, and every decision that ends or
skips work (signals, non-finite losses, early stopping on reduced metrics) is
taken by all ranks together at the same update.

An optimizer with `train()` and `eval()` methods (schedule-free optimizers' convention:
`eval()` puts the averaged weights in the model, `train()` the ones gradients are taken
at) is switched to eval around validation, the test and every checkpoint save, so
metrics, best-model selection and checkpoints all see the averaged weights. A resumed
run loads them and calls `train()` to continue.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from bprun.data.loader import InMemoryLoader
from bprun.engine import checkpoint as ckpt_io
from bprun.engine import sharded_checkpoint
from bprun.engine.callbacks import implemented
from bprun.engine.clipping import clip_grad_norm, total_norm
from bprun.engine.distributed import SINGLE, DistContext
from bprun.engine.early_stopping import EarlyStopper
from bprun.engine.fsdp import (
    full_state,
    is_sharded,
    load_full_state,
    no_gradient_sync,
)
from bprun.engine.optim_impl import impl_of
from bprun.engine.precision import Precision
from bprun.engine.settings import TrainerSettings
from bprun.engine.signals import StopSignals
from bprun.errors import BprunError, Interrupted, debugging

log = logging.getLogger("bprun")


def compile_errors_as_one_line(method):
    """With `trainer.compile`, what torch.compile raises while it traces or compiles (a C++
    compiler that fails under inductor, an op it cannot handle) ends the run with one error
    line naming the setting, not a traceback from inside the compiler. It can happen at the
    first update or later, at the first batch of a new shape."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as e:
            where = type(e).__module__
            compiler = where.startswith(("torch._dynamo", "torch._inductor"))
            if not self.settings.compile or not compiler or debugging():
                raise
            text = str(e).strip().splitlines()
            first = text[0][:300] if text else ""
            raise BprunError(
                f"trainer.compile=true: torch.compile failed ({type(e).__name__}: {first}): "
                "set trainer.compile=false to train without it (BPRUN_DEBUG=1 shows where)"
            ) from e

    return guarded


class NonFiniteLoss(BprunError):
    pass


class Trainer:
    """Fits `model` with `optimizer` on loaders of (x, y) batches.

    `loss_fn(model(x), y)` is each batch's loss (a problem's `criterion`); `problem`
    (`bprun.problems`) gives the evaluation metrics and their names (None: classification
    into `num_classes` classes).

    `extra_state` is saved in every checkpoint as it is (plain values only) and
    given back by `load_state_dict`: the caller's record of how the run was made
    (the train task keeps the config and the command line there for resume).
    """

    def __init__(
        self,
        settings: TrainerSettings,
        model: nn.Module,
        loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler=None,
        *,
        scheduler_interval: str = "epoch",
        device: torch.device | str = "cpu",
        problem=None,
        num_classes: int = 0,
        run_dir: str | Path | None = None,
        tracker=None,
        callbacks: list | tuple = (),
        extra_state: dict | None = None,
        dist: DistContext = SINGLE,
    ):
        s = self.settings = settings
        self.dist = dist
        self.device = torch.device(device)
        self.precision = Precision(s.precision, self.device)
        self.scaler = self.precision.scaler
        self.module = model  # the plain module: what checkpoints hold
        if s.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.sharded = is_sharded(model)  # trainer.strategy=fsdp: FSDP2 did the sharding
        if dist.enabled and not self.sharded:
            from torch.nn.parallel import DistributedDataParallel

            cuda = self.device.type == "cuda"
            model = DistributedDataParallel(model, device_ids=[self.device] if cuda else None)
        self.model = torch.compile(model) if s.compile else model
        self.loss_fn, self.optimizer = loss_fn, optimizer
        self.scheduler, self.scheduler_interval = scheduler, scheduler_interval
        self.plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if problem is None:  # a notebook's Trainer(..., num_classes=10): classification
            from bprun.problems.base import Problem
            from bprun.problems.classification import Classification

            problem = Classification(num_classes) if num_classes >= 2 else Problem()
        self.problem = problem
        self.last_evaluation = None  # the Evaluation of the latest `evaluate`, for reports
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.tracker = tracker
        self.extra_state = dict(extra_state or {})
        # Each hook is the list of callbacks implementing it: an unused hook costs one empty loop.
        self.callbacks = list(callbacks)
        self._on_fit_start = implemented(self.callbacks, "on_fit_start")
        self._on_train_batch = implemented(self.callbacks, "on_train_batch")
        self._on_before_step = implemented(self.callbacks, "on_before_optimizer_step")
        self._on_update_end = implemented(self.callbacks, "on_update_end")
        self._on_validation = implemented(self.callbacks, "on_validation")
        self._on_epoch_end = implemented(self.callbacks, "on_epoch_end")
        self._on_test_start = implemented(self.callbacks, "on_test_start")
        self._stateful = [cb for cb in self.callbacks if getattr(cb, "state_key", None)]
        self._on_fit_end = implemented(self.callbacks, "on_fit_end")
        self._on_summary = implemented(self.callbacks, "on_summary")
        self.uses_closure = isinstance(optimizer, torch.optim.LBFGS)
        self._check_optimizer()
        # Every parameter, frozen ones too: clipping skips those without gradients, and a
        # parameter unfrozen later (trainer.unfreeze_at_epoch) is clipped from then on.
        self.params = list(model.parameters())
        # An optimizer with its own zero_grad (state tied to the gradients) keeps it.
        self._own_zero_grad = type(optimizer).zero_grad is not torch.optim.Optimizer.zero_grad
        self._swaps_weights = callable(getattr(optimizer, "eval", None)) and callable(
            getattr(optimizer, "train", None)
        )
        self._optimizer_eval = False  # the optimizer's eval weights are in the model

        # Progress: what the next update is. Together with the RNG state this is
        # everything a resumed run needs to continue exactly.
        self.epoch = 0  # epoch being trained (0-based)
        self.batch = 0  # next batch index within the epoch
        self.update = 0  # optimizer updates done
        self.epoch_loss = [0.0, 0]  # running (sum, count) of the epoch's micro-batch losses
        self.history: list[dict] = []
        self.best: dict = {}
        self.stop_reason: str | None = None
        self.skipped = 0
        self.consecutive_skips = 0
        self._pending: list[tuple[int, torch.Tensor]] = []  # (update, loss) since the last log
        self._grad_norms: list[torch.Tensor] = []
        self._window_finite = True
        self._best_state: dict | None = None
        self._last_saved: Path | None = None
        self._last_written = 0.0  # perf_counter() of the last write of last.pt

        self.stopper = EarlyStopper(**vars(s.early_stopping))
        self.ckpt_dir = self.run_dir / "checkpoints" if self.run_dir is not None else None
        self.checkpointing = (
            s.checkpoint.enabled and self.ckpt_dir is not None and not s.fast_dev_run
        )
        # Sharded checkpoints: each rank writes its own part, a folder per checkpoint.
        fmt = s.checkpoint.format
        self.sharded_checkpoints = fmt == "dcp" or (fmt == "auto" and self.sharded)
        self.topk = (
            ckpt_io.TopK(
                self.ckpt_dir, s.checkpoint.monitor, s.checkpoint.mode, s.checkpoint.save_top_k
            )
            if self.checkpointing
            else None
        )

    # ------------------------------------------------------------------ checks
    def _check_optimizer(self) -> None:
        """What the settings cannot know alone: combinations with the optimizer."""
        s = self.settings
        if self.uses_closure:
            if self.dist.enabled:
                raise BprunError(
                    "optim=lbfgs re-evaluates each rank's own loss to decide its steps, so "
                    "ranks would part ways: train it with trainer.devices=1"
                )
            if s.accumulate > 1:
                raise BprunError(
                    "optim=lbfgs evaluates the loss several times per update through a closure and "
                    "cannot accumulate gradients: set trainer.accumulate=1"
                )
            if self.scaler is not None:
                raise BprunError(
                    "optim=lbfgs cannot run with trainer.precision=16-mixed (GradScaler has no "
                    "closure support): use precision 32 or bf16-mixed"
                )
            if s.nonfinite == "skip":
                raise BprunError("optim=lbfgs does not support trainer.nonfinite=skip: use stop")

    def metric_names(self, validates: bool = True) -> list[str]:
        """Every metric an epoch reports: train loss, validation metrics, callbacks' own."""
        names = ["train/loss"]
        if validates:
            names += self.problem.metric_names("val")
        for cb in self.callbacks:
            names += list(getattr(cb, "metric_names", ()))
            if validates and getattr(cb, "validates_as", None):  # EMA, SWA, attacks: val_<x>/*
                names += self.problem.metric_names(cb.validates_as)
        return names

    def check_monitors(self, validates: bool = True) -> None:
        """Monitored names that no epoch will report fail now, not after the first epoch."""
        s, known = self.settings, self.metric_names(validates)
        watched = [("trainer.monitor", s.monitor)]
        if self.stopper.enabled:
            watched.append(("trainer.early_stopping.monitor", s.early_stopping.monitor))
        if self.topk is not None and validates:
            watched.append(("trainer.checkpoint.monitor", s.checkpoint.monitor))
        for key, name in watched:
            if name not in known and validates:
                raise BprunError(_unknown_metric(key, name, dict.fromkeys(known)))

    # ------------------------------------------------------------------ fit
    @compile_errors_as_one_line
    def fit(self, train: InMemoryLoader, val: InMemoryLoader | None) -> dict:
        s = self.settings
        anomaly = torch.autograd.detect_anomaly() if s.detect_anomaly else contextlib.nullcontext()
        start = self._last_written = time.perf_counter()
        cpu_start = time.process_time()
        with StopSignals() as self.signals, anomaly:
            for fn in self._on_fit_start:
                fn(self, train)
            while self.epoch < s.max_epochs and self.stop_reason is None:
                self._run_epoch(train, val)
            for fn in self._on_fit_end:
                fn(self)
        if self.stop_reason is None:
            self.stop_reason = f"max_epochs={s.max_epochs} reached"
        log.info(f"stopped: {self.stop_reason}")
        self.fit_seconds = time.perf_counter() - start
        # This process's CPU seconds in fit, which a loaded machine does not inflate as it
        # does the wall time (a search's bench reads it).
        self.fit_cpu_seconds = time.process_time() - cpu_start
        return {"stop_reason": self.stop_reason, "best": self.best, "history": self.history}

    def _run_epoch(self, train: InMemoryLoader, val: InMemoryLoader | None) -> None:
        t0 = self._check_started = time.perf_counter()
        samples_before = self._check_samples = self.batch * train.batch_size
        self.model.train()
        self._train_epoch(train, val)
        self._flush_train_log()
        seconds = time.perf_counter() - t0
        samples = min(train.num_samples, self.batch * train.batch_size) - samples_before
        loss_sum, loss_count = self.epoch_loss
        metrics = {"epoch": self.epoch + 1, "update": self.update}
        metrics["train/loss"] = loss_sum / max(loss_count, 1)
        with self.eval_weights():  # schedule-free: its averaged weights validate and save
            self._end_epoch(metrics, train, val, seconds, samples)
        self._agree_on_signals()
        if self.signals.received is not None:
            self._interrupt()

    def _end_epoch(self, metrics: dict, train, val, seconds: float, samples: int) -> None:
        """Validation, best and early-stopping bookkeeping, schedule, checkpoints, logs."""
        s = self.settings
        # With trainer.val_every_n_updates the checks come by updates (`_check`), not here.
        periodic = s.val_every_n_updates is not None
        validated = val is not None and not periodic
        if validated:
            metrics.update(self.evaluate(val, "val"))
        if not periodic:
            for fn in self._on_validation:
                fn(self, metrics, val)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["time/epoch_s"] = seconds
        self._throughput(metrics, train, samples, seconds)
        if not periodic:
            self.history.append(metrics)
        if validated:
            self._track_best(metrics)
            self._early_stop(metrics)
        if self.scheduler is not None and self.scheduler_interval == "epoch":
            self._step_scheduler(metrics)
        for fn in self._on_epoch_end:
            fn(self, metrics)

        self.epoch, self.batch, self.epoch_loss = self.epoch + 1, 0, [0.0, 0]
        if self.checkpointing:
            if validated:
                self._save_topk(metrics)
            if self._last_due():
                self.save(self.ckpt_dir / "last.pt")
        if self.tracker is not None and not periodic:
            self.tracker.log(
                {k: v for k, v in metrics.items() if k not in ("epoch", "update", "train/loss")},
                self.update,
            )
        if not periodic:
            log.info(_epoch_line(metrics, s.max_epochs, s.monitor))

    def _throughput(self, metrics: dict, train, samples: int, seconds: float) -> None:
        metrics["throughput/samples_per_s"] = samples / max(seconds, 1e-9)
        tokens = getattr(train, "tokens_per_sample", None)  # token windows: tokens per second
        if tokens:
            metrics["throughput/tokens_per_s"] = samples * tokens / max(seconds, 1e-9)

    def _early_stop(self, metrics: dict) -> None:
        if not self.stopper.enabled or self.settings.fast_dev_run:
            return
        monitored = metrics.get(self.stopper.monitor)
        if monitored is None:
            raise BprunError(
                _unknown_metric("trainer.early_stopping.monitor", self.stopper.monitor, metrics)
            )
        if self.stopper.step(monitored):
            self.stop_reason = f"early stopping: {self.stopper.stopped_reason}"

    def _check(self, train, val) -> None:
        """A validation check mid-epoch (trainer.val_every_n_updates): what an epoch's end does
        with its metrics (history, best, early stopping, top-k, logs), at update granularity.
        `train/loss` is the mean since the previous check."""
        s = self.settings
        self._flush_train_log()
        now = time.perf_counter()
        seconds = now - self._check_started
        samples_now = min(train.num_samples, self.batch * train.batch_size)
        samples = max(0, samples_now - self._check_samples)
        loss_sum, loss_count = self.epoch_loss
        done_sum, done_count = self._check_loss
        metrics = {"epoch": self.epoch + 1, "update": self.update}
        metrics["train/loss"] = (loss_sum - done_sum) / max(loss_count - done_count, 1)
        self._check_loss = (loss_sum, loss_count)
        if val is not None:
            metrics.update(self.evaluate(val, "val"))
        for fn in self._on_validation:
            fn(self, metrics, val)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["time/check_s"] = seconds
        self._throughput(metrics, train, samples, seconds)
        self.history.append(metrics)
        if val is not None:
            self._track_best(metrics)
            self._early_stop(metrics)
            if self.checkpointing:
                self._save_topk(metrics)
        if self.tracker is not None:
            self.tracker.log(
                {k: v for k, v in metrics.items() if k not in ("epoch", "update", "train/loss")},
                self.update,
            )
        log.info(_check_line(metrics, s.max_updates, s.monitor))
        self.model.train()
        self._check_started, self._check_samples = time.perf_counter(), samples_now

    @contextlib.contextmanager
    def eval_weights(self):
        """The optimizer's evaluation weights in the model for the block (schedule-free
        averaging; nothing for other optimizers). Nested blocks switch once."""
        if not self._swaps_weights or self._optimizer_eval:
            yield
            return
        self.optimizer.eval()
        self._optimizer_eval = True
        try:
            yield
        finally:
            self.optimizer.train()
            self._optimizer_eval = False

    def _last_due(self) -> bool:
        """At an epoch's end (counters already advanced): is last.pt to be written now?

        Always when training ends here; otherwise once `last_every_n_seconds` passed since
        the last write, so tiny epochs do not pay a fsync each (a SIGKILL loses at most
        that long plus the epoch in flight; resume from the file on disk stays exact)."""
        every = self.settings.checkpoint.last_every_n_seconds
        ends = self.stop_reason is not None or self.epoch >= self.settings.max_epochs
        return ends or not every or time.perf_counter() - self._last_written >= every

    def _train_epoch(self, loader: InMemoryLoader, val: InMemoryLoader | None = None) -> None:
        s = self.settings
        self._check_loss = tuple(self.epoch_loss)  # (sum, count) at the previous check
        k = s.accumulate
        n = len(loader)
        bar = None
        if s.progress and sys.stdout.isatty():
            bar = tqdm(
                total=n,
                initial=self.batch,
                desc=f"epoch {self.epoch + 1}/{s.max_epochs}",
                unit="batch",
                leave=False,
                dynamic_ncols=True,
            )
        for b, (x, y) in enumerate(loader.batches(self.epoch, self.batch), start=self.batch):
            for fn in self._on_train_batch:  # mixup, adversarial examples
                x, y = fn(self, x, y)
            if s.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.uses_closure:
                self._closure_step(x, y)
            else:
                scale = None
                if k > 1 or self.dist.enabled:
                    # Weight by samples, so that k batches of b equal one batch of k*b and
                    # DDP's mean over ranks equals the mean over the global batch.
                    first = b - b % k
                    last = min(first + k, n)
                    window = (
                        min(last * loader.batch_size, loader.num_samples)
                        - first * loader.batch_size
                    )
                    # (the data's shards: the ranks, or the dp groups under tensor parallelism)
                    scale = loader.local_len(b) * loader.sampler.world_size / window
                final = (b + 1) % k == 0 or b + 1 == n
                if final or not self.dist.enabled:
                    self._backward(x, y, scale)
                else:  # all-reduce (or reduce-scatter) once per update, not per micro-batch
                    with no_gradient_sync(self.module) if self.sharded else self.model.no_sync():
                        self._backward(x, y, scale)
                if not final:
                    continue
                self._optimizer_step()
            self.batch = b + 1
            self.update += 1
            for fn in self._on_update_end:
                fn(self)
            if bar is not None:
                bar.update(self.batch - bar.n)
            if self.update % s.log_every_n_updates == 0:
                self._flush_train_log(bar)
                self._agree_on_signals()
            if (
                self.checkpointing
                and s.checkpoint.every_n_updates
                and self.update % s.checkpoint.every_n_updates == 0
            ):
                self._flush_train_log(bar)
                self.save(self.ckpt_dir / "last.pt")
            if self.signals.received is not None and (
                not self.dist.enabled or self.update % s.log_every_n_updates == 0
            ):
                self._interrupt()
            last = s.max_updates is not None and self.update >= s.max_updates
            every = s.val_every_n_updates
            if every is not None and (self.update % every == 0 or last):
                with self.eval_weights():
                    self._check(loader, val)
                if self.stop_reason is not None:
                    break
            if last:
                self.stop_reason = f"max_updates={s.max_updates} reached"
                break
        if bar is not None:
            bar.close()

    def _backward(self, x: torch.Tensor, y: torch.Tensor, scale: float | None) -> None:
        with self.precision.autocast():
            loss = self.loss_fn(self.model(x), y)
        if self.settings.nonfinite == "skip" and not torch.isfinite(loss):
            self._window_finite = False
            if not self.dist.enabled:
                return
            # Every rank must join the gradient all-reduce (the window is dropped anyway) and
            # log as many losses as the others (a zero stands for the skipped one).
            loss = loss.nan_to_num() * 0
            self._pending.append((self.update, loss.detach()))
        else:
            self._pending.append((self.update, loss.detach()))
        if scale is not None:
            loss = loss * scale
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def _closure_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        def closure():
            self.optimizer.zero_grad(set_to_none=True)
            with self.precision.autocast():
                loss = self.loss_fn(self.model(x), y)
            loss.backward()
            self._clip()
            return loss

        loss = self.optimizer.step(closure)
        self._pending.append((self.update, loss.detach()))
        if self.scheduler is not None and self.scheduler_interval == "step":
            self._step_scheduler({})

    def _clip(self) -> None:
        clip = self.settings.grad_clip
        if clip.max is None:
            return
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip true gradients, not scaled ones
        if clip.algorithm == "norm":
            norm = clip_grad_norm(self.params, clip.max)
        else:
            norm = total_norm(self.params)
            nn.utils.clip_grad_value_(self.params, clip.max)
        self._grad_norms.append(norm.detach())

    def _optimizer_step(self) -> None:
        if self.settings.nonfinite == "skip" and self.dist.enabled:
            self._window_finite = not self.dist.any(not self._window_finite, self.device)
        if not self._window_finite:  # nonfinite=skip: drop the whole window's gradients
            self._zero_grad()
            self._window_finite = True
            self.skipped += 1
            self.consecutive_skips += 1
            if self.tracker is not None:
                self.tracker.log({"train/skipped_updates": self.skipped}, self.update + 1)
            log.warning(
                f"update {self.update + 1}: non-finite loss, update skipped ({self.skipped} so far)"
            )
            if self.consecutive_skips > self.settings.max_consecutive_skips:
                raise NonFiniteLoss(
                    f"{self.consecutive_skips} consecutive updates had a non-finite loss "
                    f"(trainer.max_consecutive_skips={self.settings.max_consecutive_skips}); "
                    "lower optim.lr or set trainer.grad_clip.max"
                )
            return
        self.consecutive_skips = 0
        self._clip()
        for fn in self._on_before_step:
            fn(self)
        if self.scaler is None:
            self.optimizer.step()
            stepped = True
        elif self.scheduler is None or self.scheduler_interval != "step":
            self.scaler.step(self.optimizer)
            self.scaler.update()
            stepped = True
        else:
            # The scaler skips updates whose gradients overflowed; a per-update scheduler
            # must too. Reading the scale syncs with the device, so only then.
            before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            stepped = self.scaler.get_scale() >= before
        self._zero_grad()
        if stepped and self.scheduler is not None and self.scheduler_interval == "step":
            self._step_scheduler({})

    def _zero_grad(self) -> None:
        if self._own_zero_grad:
            self.optimizer.zero_grad(set_to_none=True)
            return
        # What Optimizer.zero_grad(set_to_none=True) does, without the profiler record and
        # dispatch around it: about 18 us an update on a CPU, 1-2% of a small model's step.
        for p in self.params:
            p.grad = None

    def _step_scheduler(self, metrics: dict) -> None:
        if self.plateau:
            value = metrics.get(self.settings.monitor)
            if value is not None:
                self.scheduler.step(value)
        else:
            self.scheduler.step()

    def _flush_train_log(self, bar=None) -> None:
        """Read the losses since the last log (one host sync), check them, log them."""
        if not self._pending:
            return
        losses = torch.stack([loss for _, loss in self._pending]).float()
        if self.dist.enabled:  # the mean over ranks; a non-finite loss anywhere stops all
            losses = self.dist.sum_(losses) / self.dist.world_size
        finite = torch.isfinite(losses)
        if not bool(finite.all()):
            first = int((~finite).nonzero()[0, 0])
            bad_update = self._pending[first][0] + 1
            last = (
                f"last good checkpoint: {self._last_saved}"
                if self._last_saved
                else "no checkpoint was written before it"
            )
            raise NonFiniteLoss(
                f"loss became non-finite ({losses[first].item()}) at update {bad_update} "
                f"(epoch {self.epoch + 1}); training stopped, {last}. Try a lower optim.lr, "
                "trainer.grad_clip.max, or trainer.nonfinite=skip"
            )
        total = float(losses.sum())
        self.epoch_loss = [self.epoch_loss[0] + total, self.epoch_loss[1] + len(losses)]
        scalars = {"train/loss": total / len(losses), "lr": self.optimizer.param_groups[0]["lr"]}
        if self._grad_norms:
            scalars["train/grad_norm"] = float(torch.stack(self._grad_norms).mean())
        self._pending.clear()
        self._grad_norms.clear()
        if self.tracker is not None:
            self.tracker.log(scalars, self.update)
        if bar is not None:
            bar.set_postfix(loss=f"{scalars['train/loss']:.4f}")

    def summarize(self, summary: dict) -> dict:
        """Let the callbacks add their results to the run's summary (metrics.json)."""
        for fn in self._on_summary:
            fn(self, summary)
        return summary

    # ------------------------------------------------------------------ evaluation
    @compile_errors_as_one_line
    @torch.no_grad()
    def evaluate(self, loader: InMemoryLoader, prefix: str, perturb=None) -> dict[str, float]:
        """Metrics of `loader` named `<prefix>/<metric>`. `perturb(model, x, y)`, when given,
        replaces each batch's inputs first (an adversarial attack; it enables grad itself)."""
        # Under DDP each rank evaluates its part of every batch with the plain module
        # (no collective per batch); the sums are reduced once at the end.
        model = self.module if self.dist.enabled else self.model
        was_training = model.training
        model.eval()
        metrics = self.problem.evaluation(self.device)
        for i, (x, y) in enumerate(loader.batches()):
            empty = loader.local_len(i) == 0
            if empty and not self.sharded:  # sharded units gather in every rank's forward
                continue
            if perturb is not None:
                x = perturb(model, x, y)
            if self.settings.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with self.precision.autocast():
                out = model(x)
                loss = self.loss_fn(out, y) if not empty else None
            if not empty:
                metrics.update(loss, out, y)
        model.train(was_training)
        results = metrics.compute(prefix)  # one host read; under DDP, over every rank's part
        self.last_evaluation = metrics
        return results

    def test(self, loader: InMemoryLoader) -> dict[str, float]:
        """Evaluate on the test split with the best-validation weights."""
        if self._swaps_weights:
            self.optimizer.eval()  # what follows loads averaged weights into the model
            self._optimizer_eval = True
        best = self.topk.best if self.topk is not None else None
        if best is not None and sharded_checkpoint.is_sharded(best):
            sharded_checkpoint.load(best, self.module)  # each rank reads its own shards
            self._load_callbacks(sharded_checkpoint.read_state(best), best)
        elif best is not None and best.exists():
            state = ckpt_io.load_checkpoint(best)
            self._load_model(state["model"], best)
            self._load_callbacks(state, best)
        elif self._best_state is not None:
            self.module.load_state_dict(self._best_state["model"])
            self._load_callbacks(self._best_state, "the best epoch")
        if self.dist.enabled and not self.sharded:  # rank 0's weights everywhere, whichever
            for t in self.module.state_dict().values():
                self.dist.broadcast_(t)
        for fn in self._on_test_start:
            fn(self)
        with self.eval_weights():
            return self.evaluate(loader, "test")

    def _track_best(self, metrics: dict) -> None:
        value = metrics.get(self.settings.monitor)
        if value is None:
            raise BprunError(_unknown_metric("trainer.monitor", self.settings.monitor, metrics))
        if not math.isfinite(value):
            return
        old = self.best.get(self.settings.monitor)
        if old is None or (value < old if self.settings.mode == "min" else value > old):
            self.best = dict(metrics)
            if self.topk is None or self.topk.k == 0:
                self._best_state = _cloned(
                    {"model": self.module.state_dict(), "callbacks": self._callback_states()}
                )

    # ------------------------------------------------------------------ checkpoints
    def _load_model(self, state: dict, path) -> None:
        if self.sharded:
            load_full_state(self.module, self.optimizer, state)
        else:
            ckpt_io.load_model_state(self.module, state, path)

    def state_dict(self) -> dict:
        """Everything a resume needs. Sharded (FSDP), the model and optimizer state are
        gathered in full, so the checkpoint loads on any number of ranks: every rank calls it."""
        if self.sharded:
            model_state, optim_state = full_state(self.module, self.optimizer)
        else:
            model_state, optim_state = self.module.state_dict(), self.optimizer.state_dict()
        return {"model": model_state, "optimizer": optim_state, **self.run_state()}

    def run_state(self) -> dict:
        """The checkpoint's state besides the model and the optimizer."""
        return {
            "format": ckpt_io.FORMAT_VERSION,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": ckpt_io.rng_state(),
            "world_size": self.dist.world_size,
            "progress": {
                "epoch": self.epoch,
                "batch": self.batch,
                "update": self.update,
                "epoch_loss": list(self.epoch_loss),
                "skipped": self.skipped,
            },
            "early_stopping": self.stopper.state_dict(),
            "topk": self.topk.state_dict() if self.topk is not None else None,
            "best": dict(self.best),
            "history": list(self.history),
            "extra": self.extra_state,
            "callbacks": self._callback_states(),
        }

    def _callback_states(self) -> dict:
        return {cb.state_key: cb.state_dict() for cb in self._stateful}

    def _load_callbacks(self, state: dict, path) -> None:
        saved = state.get("callbacks") or {}
        for cb in self._stateful:
            cb.load_state_dict(saved.get(cb.state_key), path)

    def load_state_dict(self, state: dict, path: str | Path = "checkpoint") -> None:
        """Restore a checkpoint's state. One read with `load_checkpoint(weights=False)` from
        a sharded checkpoint has no model: each rank then reads its part of `path` itself."""
        if "model" not in state and sharded_checkpoint.is_sharded(path):
            sharded_checkpoint.load(
                Path(path),
                self.module,
                self.optimizer,
                lambda groups: self._check_optimizer_impl({"param_groups": groups}, path),
            )
        elif self.sharded:
            self._check_optimizer_impl(state["optimizer"], path)
            load_full_state(self.module, self.optimizer, state["model"], state["optimizer"])
        else:
            self._check_optimizer_impl(state["optimizer"], path)
            ckpt_io.load_model_state(self.module, state["model"], path)
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self._load_scheduler(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        p = state["progress"]
        self.epoch, self.batch, self.update = p["epoch"], p["batch"], p["update"]
        self.epoch_loss, self.skipped = list(p["epoch_loss"]), p["skipped"]
        self.stopper.load_state_dict(state["early_stopping"])
        if self.topk is not None and state.get("topk") is not None:
            self.topk.load_state_dict(state["topk"])
        self.best, self.history = dict(state["best"]), list(state["history"])
        self.extra_state = dict(state.get("extra") or {})
        self._load_callbacks(state, path)
        self._last_saved = Path(path)
        rng = state["rng"]
        ranks = state.get("rng_ranks")
        if self.dist.enabled and ranks is not None and len(ranks) == self.dist.world_size:
            rng = ranks[self.dist.rank]  # each rank continues its own random streams
        ckpt_io.set_rng_state(rng)
        if self._swaps_weights:  # saved with the averaged weights in the model: back to training
            self._optimizer_eval = False
            self.optimizer.train()

    def _check_optimizer_impl(self, saved: dict, path: str | Path) -> None:
        """Fused, foreach and single kernels round differently, and torch's load_state_dict
        would silently switch to the checkpoint's: a resume steps with the same one or stops."""
        before, now = impl_of(saved.get("param_groups", [])), impl_of(self.optimizer.param_groups)
        if before is not None and now is not None and before != now:
            raise BprunError(
                f"checkpoint {path} was trained with optim.impl={before}, this run would step "
                f"with {now}: resume with optim.impl={before} for an exact continuation"
            )

    def _load_scheduler(self, state: dict) -> None:
        """Restore the scheduler; a schedule whose length no longer fits the run is an error.

        Stretching a half-done cosine or one-cycle schedule would not give the
        curve either was configured for (a finished cosine sits at eta_min), so
        a longer resumed run needs sched=none or the run's own length.
        """
        parts = [self.scheduler, *getattr(self.scheduler, "_schedulers", [])]
        lengths = [
            {k: getattr(p, k) for k in ("T_max", "total_steps") if hasattr(p, k)} for p in parts
        ]
        self.scheduler.load_state_dict(state)
        for part, fresh in zip(parts, lengths, strict=True):
            for key, value in fresh.items():
                if getattr(part, key) != value:
                    raise BprunError(
                        f"the checkpoint's {type(part).__name__} was built for {key}="
                        f"{getattr(part, key)} scheduler steps, this run needs {value}: resume with "
                        "the run's own trainer.max_epochs and max_updates"
                    )

    def save(self, path: Path) -> Path:
        """Write a checkpoint. Under DDP every rank calls this (each contributes its RNG
        state), rank 0 writes, and no rank goes on before the file is complete."""
        self._flush_train_log()  # never save state that follows a non-finite loss
        if self.sharded_checkpoints:
            path = self._save_sharded(path)
        else:
            with self.eval_weights():
                state = _cloned(self.state_dict()) if self._swaps_weights else self.state_dict()
            self._check_finite(state)  # nor weights that a finite loss's update blew up
            if self.dist.enabled:
                state["rng_ranks"] = self.dist.gather(state["rng"])
            if self.dist.is_main:
                ckpt_io.atomic_save(state, path)
            self.dist.barrier()
        self._last_saved = path
        if path.stem == "last":
            self._last_written = time.perf_counter()
        return path

    def _save_sharded(self, path: Path) -> Path:
        """`path` as a sharded checkpoint's folder (`last.pt` -> `last/`): every rank writes
        its own shards of the model and optimizer, rank 0 the rest."""
        with self.eval_weights():
            whole = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}
            self._check_finite(whole)  # under FSDP: each rank its own shards
            state = self.run_state()
            if self.dist.enabled:
                state["rng_ranks"] = self.dist.gather(state["rng"])
            folder = sharded_checkpoint.folder_for(path)
            return sharded_checkpoint.save(folder, self.module, self.optimizer, state, self.dist)

    def _check_finite(self, state: dict) -> None:
        if self.sharded:  # the gathered state is rank 0's alone: each rank checks its shards
            parts = (self.module.state_dict(), *self.optimizer.state.values())
            local = [getattr(t, "_local_tensor", t) for part in parts for t in part.values()]
            finite = all(bool(t.isfinite().all()) for t in local if _is_float(t))
            bad, ok = [], not self.dist.any(not finite, self.device)
        else:
            model = state["model"]
            tensors = [
                t
                for part in (model, *state["optimizer"]["state"].values())
                for t in part.values()
                if _is_float(t)
            ]
            ok = not tensors or bool(torch.stack([t.isfinite().all() for t in tensors]).all())
            bad = [k for k, v in model.items() if _is_float(v) and not v.isfinite().all()]
        if ok:
            return
        last = self._last_saved or "no checkpoint was written before it"
        raise NonFiniteLoss(
            f"weights became non-finite at update {self.update} (epoch {self.epoch + 1}"
            f"{'; ' + ', '.join(bad[:4]) if bad else ', optimizer state'}); training stopped, "
            f"last good checkpoint: {last}. Try a lower optim.lr or trainer.grad_clip.max"
        )

    def _save_topk(self, metrics: dict) -> None:
        value = metrics.get(self.topk.monitor)
        if value is None:
            raise BprunError(
                _unknown_metric("trainer.checkpoint.monitor", self.topk.monitor, metrics)
            )
        if not self.topk.wants(value):
            return
        saved = self.save(self.ckpt_dir / self.topk.file_name(self.epoch, self.update, value))
        for old in self.topk.add(value, saved.name):
            if self.dist.is_main:
                ckpt_io.remove(old)

    def _agree_on_signals(self) -> None:
        """A signal that reached any rank stops all of them at the same update.

        Checked at log intervals and epoch ends (one small all-reduce each), so a
        signal is acted on within `trainer.log_every_n_updates` updates.
        """
        if self.dist.enabled:
            signum = self.dist.max_int(self.signals.received or 0, self.device)
            self.signals.received = signum or None

    def _interrupt(self) -> None:
        import signal

        signum = self.signals.received
        where = ""
        if self.ckpt_dir is not None and not self.settings.fast_dev_run:
            path = self.save(self.ckpt_dir / "last.pt")
            where = f"; saved {path}. Resume with:\n  bprun trainer.resume={self.run_dir}"
        raise Interrupted(
            f"stopped by {signal.Signals(signum).name} after update {self.update}{where}", signum
        )


def _is_float(t) -> bool:
    return torch.is_tensor(t) and t.is_floating_point()


def _cloned(tree):
    """A copy of nested dicts and lists whose tensors no longer share storage with the model."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: _cloned(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_cloned(v) for v in tree]
    return tree


def _unknown_metric(key: str, name: str, metrics: dict) -> str:
    known = [k for k in metrics if "/" in k]
    near = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {key}={near[0]}? " if near else ""
    return f"{key}={name} is not a metric of this run: {hint}(choose one of {', '.join(known)})"


EPOCH_LINE_METRICS = 4  # per prefix (val/, val_ema/, ...), the monitored one besides


def _check_line(m: dict, max_updates: int | None, monitor: str = "") -> str:
    """One line per validation check of trainer.val_every_n_updates."""
    of = f"/{max_updates}" if max_updates else ""
    return _epoch_line(m, 0, monitor, head=f"update {m['update']:>5}{of}")


def _epoch_line(m: dict, max_epochs: int, monitor: str = "", head: str | None = None) -> str:
    """One line per epoch: each prefix's first metrics and the monitored one (all of them go
    to the trackers and metrics.json)."""
    parts = [head or f"epoch {m['epoch']:>3}/{max_epochs}"]
    shown: dict[str, int] = {}
    for k, v in m.items():
        if k in ("epoch", "update", "lr") or k.startswith(("time/", "throughput/")):
            continue
        prefix = k.split("/", 1)[0]
        shown[prefix] = shown.get(prefix, 0) + 1
        if shown[prefix] <= EPOCH_LINE_METRICS or k == monitor:
            parts.append(f"{k} {v:.4f}")
    if "throughput/tokens_per_s" in m:
        parts.append(f"{m['throughput/tokens_per_s']:,.0f} tokens/s")
    parts.append(f"{m.get('time/epoch_s', m.get('time/check_s', 0.0)):.1f}s")
    return "  ".join(parts)
