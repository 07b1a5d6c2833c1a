"""The job side of a search: report the monitored metric to the trial, stop when pruned.

A job launched by the Optuna sweeper carries `search.trial=<number>`; it opens
the study through its storage (the journal file or database the sweeper uses,
so the job may run in another process or on another machine), reports the
run's monitored validation metric after every epoch, and asks the study's
pruner whether to go on. A pruned run stops like an early-stopped one: its
checkpoints and metrics.json are written, its status is "pruned".

Under several processes (torch.distributed), rank 0 reports and decides and
the decision reaches every rank, so all stop together.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bprun.engine.callbacks import Callback
from bprun.errors import BprunError

log = logging.getLogger("bprun")


def search_callbacks(cfg: DictConfig) -> list:
    """The pruning callback for a search's job; nothing for any other run."""
    if OmegaConf.select(cfg, "search.trial") is None:
        return []
    from bprun.search.settings import SearchSettings

    settings: SearchSettings = OmegaConf.to_object(cfg.search)
    settings.validate()
    if settings.storage is None:
        raise BprunError(
            f"search.trial={settings.trial} needs search.storage: the trial lives in the study's "
            "storage, which the search passes to each of its jobs"
        )
    return [PruningCallback(settings, cfg.trainer.monitor, cfg.trainer.max_epochs)]


class PruningCallback(Callback):
    def __init__(self, settings, monitor: str, max_epochs: int):
        self.settings, self.monitor, self.max_epochs = settings, monitor, max_epochs
        self.trial = None
        self.pruned_at: dict | None = None  # {"epoch", "update"} of the report that stopped it
        self.by_updates = False  # report at each validation check, step = update count
        self.open_s = self.report_s = 0.0  # the storage round trips: opening, reporting

    def on_fit_start(self, trainer, train_loader) -> None:
        self.by_updates = trainer.settings.val_every_n_updates is not None
        if not _is_rank0():
            return
        start = time.perf_counter()
        import optuna
        from optuna.trial import TrialState

        from bprun.search.study import make_pruner, open_study, storage_spec

        spec = storage_spec(self.settings, Path("."))
        steps = 1  # the pruner's steps per epoch
        if self.by_updates:
            steps = max(1, math.ceil(len(train_loader) / trainer.settings.accumulate))
        pruner = make_pruner(self.settings, self.max_epochs, steps)
        study = open_study(self.settings, spec, pruner=pruner)
        number = self.settings.trial
        try:
            trial_id = study._storage.get_trial_id_from_study_id_trial_number(
                study._study_id, number
            )
        except KeyError:
            raise BprunError(
                f"search.trial={number} is not a trial of study {self.settings.study_name}"
            ) from None
        state = study._storage.get_trial(trial_id).state
        if state != TrialState.RUNNING:
            raise BprunError(
                f"trial {number} of study {self.settings.study_name} is {state.name.lower()}, not "
                "running: a finished trial takes no more reports"
            )
        self.trial = optuna.trial.Trial(study, trial_id)
        self.open_s = time.perf_counter() - start

    def on_validation(self, trainer, metrics: dict, val_loader) -> None:
        if self.by_updates:  # a check every N updates (and then never at an epoch's end)
            self._report(trainer, metrics, int(metrics["update"]))

    def on_epoch_end(self, trainer, metrics: dict) -> None:
        if not self.by_updates:
            self._report(trainer, metrics, int(metrics["epoch"]))

    def _report(self, trainer, metrics: dict, step: int) -> None:
        prune = False
        if self.trial is not None:
            value = metrics.get(self.monitor)
            if value is not None and math.isfinite(value):
                start = time.perf_counter()
                self.trial.report(float(value), step=step)
                prune = self.trial.should_prune()
                self.report_s += time.perf_counter() - start
        if _agreed(prune):
            epoch, update = int(metrics["epoch"]), int(metrics["update"])
            self.pruned_at = {"epoch": epoch, "update": update}
            where = f"update {update} (epoch {epoch})" if self.by_updates else f"epoch {epoch}"
            trainer.stop_reason = f"pruned by search.pruner={self.settings.pruner} after {where}"

    def on_summary(self, trainer, summary: dict) -> None:
        if self.trial is not None:  # read back into the trial's trial.json
            summary["search_storage_s"] = {"open": self.open_s, "reports": self.report_s}
        if self.pruned_at is not None and summary["status"] == "completed":
            summary["status"] = "pruned"  # stopped on purpose: the search tells the trial so
            summary["search_pruned_at"] = self.pruned_at


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _agreed(prune: bool) -> bool:
    """Rank 0's decision, on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return prune
    import torch

    flag = torch.tensor([1.0 if prune else 0.0])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.broadcast(flag, src=0)
    return bool(flag.item())
