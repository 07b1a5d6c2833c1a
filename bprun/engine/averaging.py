"""Averaged weights: an exponential moving average (EMA) or stochastic weight averaging (SWA).

The average is a set of tensors beside the model's state (parameters and
buffers), updated in place with one fused `_foreach_lerp_` per update (EMA) or
per epoch (SWA): no copy of the module, no host-device synchronisation, so
`torch.compile`, `channels_last` and any precision keep working. Each epoch the
average is swapped into the model, validated (`val_ema/*`, `val_swa/*`, which
`trainer.monitor`, early stopping and checkpoint ranking can name), and
swapped out. Checkpoints hold it, resume restores it exactly, and the test
split is evaluated with it.

Under FSDP (`trainer.strategy=fsdp`) the average is sharded as the model is: each rank averages
its own shards of the parameters (DTensors), and a checkpoint gathers them in full, so it
loads on any number of ranks (every rank calls `state_dict` and `load_state_dict`).

torch.optim.swa_utils.AveragedModel is not used: its update reads its counter
on the host (`if self.n_averaged == 0`), one synchronisation per update, and it
keeps a second module; `update_bn` is used as it is.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from bprun.engine.callbacks import Callback
from bprun.engine.fsdp import placed_like, plain
from bprun.engine.settings import TrainerSettings
from bprun.errors import BprunError

log = logging.getLogger("bprun")

STATE_KEY = "averaging"


class WeightAveraging(Callback):
    """EMA (`kind="ema"`) or SWA (`kind="swa"`) of `model`'s state, by `settings.ema`/`.swa`."""

    state_key = STATE_KEY

    def __init__(
        self,
        kind: str,
        model: nn.Module,
        settings: TrainerSettings,
    ):
        self.kind, self.module = kind, model
        self.ema, self.swa = settings.ema, settings.swa
        self.prefix = f"val_{kind}"
        # The problem's metrics under this prefix, each epoch: the trainer names them before
        # training, so that trainer.monitor=val_ema/loss is checked then.
        self.validates_as = self.prefix
        device = "cpu" if kind == "ema" and self.ema.device == "cpu" else None
        self.average = {
            k: v.detach().to(device or v.device, copy=True) for k, v in model.state_dict().items()
        }
        self.count = 0  # averaging steps taken
        self.base_lrs: list[float] | None = None  # SWA: each group's lr when SWA began
        self.train_loader = None
        self._bind()

    def _bind(self) -> None:
        """Pair each averaged tensor with its live one: floats are averaged, others copied."""
        live = self.module.state_dict()
        floats = [k for k, v in self.average.items() if v.is_floating_point()]
        self._avg_f = [self.average[k] for k in floats]
        self._live_f = [live[k] for k in floats]
        self._pairs_other = [(self.average[k], live[k]) for k in self.average if k not in floats]
        self._to_cpu = any(
            a.device != t.device for a, t in zip(self._avg_f, self._live_f, strict=True)
        )

    def _average_in(self, weight: float) -> None:
        live = self._live_f
        if self._to_cpu:
            live = [t.to("cpu", non_blocking=True) for t in live]
        torch._foreach_lerp_(self._avg_f, live, weight)
        for avg, t in self._pairs_other:
            avg.copy_(t)
        self.count += 1

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer, train_loader) -> None:
        self.train_loader = train_loader
        self._bind()  # the model's tensors may have been replaced by a checkpoint load

    def on_before_optimizer_step(self, trainer) -> None:
        if self.kind == "swa" and self.swa.lr is not None and self._swa_epoch(trainer) >= 0:
            groups = trainer.optimizer.param_groups
            if self.base_lrs is None:
                self.base_lrs = [float(g["lr"]) for g in groups]
            t = min(1.0, (self._swa_epoch(trainer) + 1) / self.swa.anneal_epochs)
            share = t if self.swa.anneal_strategy == "linear" else (1 - math.cos(math.pi * t)) / 2
            for g, base in zip(groups, self.base_lrs, strict=True):
                g["lr"] = base + (self.swa.lr - base) * share

    def on_update_end(self, trainer) -> None:
        if self.kind != "ema" or trainer.update % self.ema.every_n_updates:
            return
        decay = self.ema.decay
        if self.ema.warmup:
            decay = min(decay, (1 + self.count) / (10 + self.count))
        self._average_in(1 - decay)

    def on_validation(self, trainer, metrics: dict, val_loader) -> None:
        if self.kind == "swa":
            if self._swa_epoch(trainer) < 0:
                # Before SWA starts the averaged weights are the current ones.
                metrics.update({self._renamed(k): v for k, v in metrics.items() if k[:4] == "val/"})
                return
            self._average_in(1 / (self.count + 1))
        if val_loader is not None:
            with self.swapped_in():
                metrics.update(trainer.evaluate(val_loader, self.prefix))

    def on_test_start(self, trainer) -> None:
        """The test (and what follows) uses the averaged weights; SWA recomputes BatchNorm."""
        if self.count == 0:
            log.info(f"no {self.kind.upper()} average was taken: testing the trained weights")
            return
        copy_into(self.module, self.average)
        if self.kind == "swa" and self.train_loader is not None:
            recompute_batch_norm(self.module, self.train_loader)
        log.info(f"testing the {self.kind.upper()} weights ({self.count} averaging steps)")

    def on_summary(self, trainer, summary: dict) -> None:
        summary[self.kind] = {"averaging_steps": self.count}

    # ------------------------------------------------------------------ helpers
    def _swa_epoch(self, trainer) -> int:
        """Epochs since SWA began (0 in the first SWA epoch), negative before it."""
        return trainer.epoch + 1 - self.swa.start_epoch

    def _renamed(self, key: str) -> str:
        return self.prefix + key[3:]

    def swapped_in(self):
        return _Swap(self.module, self.average)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "count": self.count,
            "base_lrs": self.base_lrs,
            "weights": {k: plain(v) for k, v in self.average.items()},  # sharded: gathered
        }

    def load_state_dict(self, state: dict | None, path: str | Path = "checkpoint") -> None:
        """Restore the average; None (a checkpoint written without averaging) restarts it from
        the model's current weights."""
        if state is None:
            log.warning(
                f"{path} holds no averaged weights: {self.kind.upper()} starts from its weights"
            )
            for k, v in self.module.state_dict().items():
                self.average[k].copy_(v)
            self.count, self.base_lrs = 0, None
            return
        if state["kind"] != self.kind:
            raise BprunError(
                f"{path} holds {state['kind'].upper()} weights but this run averages by "
                f"{self.kind.upper()}: resume with the trainer.{state['kind']} settings it was "
                "trained with"
            )
        weights = state["weights"]
        if set(weights) != set(self.average):
            raise BprunError(
                f"the averaged weights in {path} do not match the configured model; "
                "use the model config the checkpoint was trained with"
            )
        for k, avg in self.average.items():
            avg.copy_(placed_like(weights[k], avg))
        self.count = int(state["count"])
        base = state.get("base_lrs")
        self.base_lrs = [float(b) for b in base] if base is not None else None


class _Swap:
    """Within `with`: the model holds `weights`; afterwards its own state again."""

    def __init__(self, module: nn.Module, weights: dict):
        self.module, self.weights = module, weights

    def __enter__(self):
        self.saved = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        copy_into(self.module, self.weights)

    def __exit__(self, *exc):
        copy_into(self.module, self.saved)


@torch.no_grad()
def copy_into(module: nn.Module, weights: dict) -> None:
    for k, t in module.state_dict().items():
        t.copy_(weights[k])


def recompute_batch_norm(module: nn.Module, loader) -> None:
    """BatchNorm running statistics of the averaged weights, from one pass over `loader`'s
    whole batches. Under DDP every rank makes the one-process pass through the plain module:
    through the DDP wrapper each forward would first overwrite the statistics with rank 0's,
    and a rank's share of the data would give its own statistics, not the run's."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        torch.optim.swa_utils.update_bn(loader.unsharded().batches(0), module)


def averaging_callbacks(settings: TrainerSettings, model: nn.Module) -> list[WeightAveraging]:
    """The averaging callback the settings switch on (none when both are off)."""
    for kind, on in (("ema", settings.ema.decay), ("swa", settings.swa.start_epoch)):
        if on is not None:
            return [WeightAveraging(kind, model, settings)]
    return []


def use_averaged_weights(module: nn.Module, state: dict, train_loader) -> str:
    """Load the averaged weights a checkpoint holds into `module` (SWA: and recompute its
    BatchNorm statistics on `train_loader`); returns which weights are in it: ema, swa or raw."""
    entry = (state.get("callbacks") or {}).get(STATE_KEY)
    if entry is None or int(entry["count"]) == 0:
        return "raw"
    copy_into(module, entry["weights"])
    if entry["kind"] == "swa":
        recompute_batch_norm(module, train_loader)
    return str(entry["kind"])
