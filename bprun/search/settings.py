"""The `search` node: what a search runs, where it keeps its state, how it prunes.

A plain dataclass registered as the schema of the top-level `search` key, so a
misspelt setting fails when the config is composed. No Optuna import here: the
command line validates the config before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from bprun.errors import BprunError

SAMPLERS = ("tpe", "random", "cmaes", "qmc", "grid")
PRUNERS = ("median", "percentile", "successive_halving", "hyperband", "none")


@dataclass
class SearchSettings:
    # The study; runs of the same command with the same name and storage continue it.
    study_name: str = "bprun"
    # None: a journal file `optuna.journal` in the sweep folder. A path: that journal file.
    # A SQLAlchemy URL (postgresql://user@host/db, sqlite:///file.db): a shared database.
    storage: str | None = None
    n_trials: int = 20  # trials in the study in all (complete, pruned or failed)
    n_jobs: int = 1  # trials at a time on this machine
    sampler: str = "tpe"  # tpe | random | cmaes | qmc | grid
    seed: int | None = 0  # the sampler's seed; None: a fresh one each time
    n_startup_trials: int = 5  # sampler: random trials before TPE/CMA-ES model the space
    pruner: str = "median"  # median | percentile | successive_halving | hyperband | none
    percentile: float = 25.0  # pruner=percentile: keep trials in the best this percent
    pruner_startup_trials: int = 3  # trials that finish before any trial is pruned
    # Epochs a trial runs before it can be pruned. 1: the setting that ran the fewest epochs
    # without ever stopping the best trial, replayed on the shipped search's learning curves
    # (README, "Where a trial's time goes").
    n_warmup_steps: int = 1
    # Report the monitored validation metric to the trial (and ask the pruner) every N
    # updates rather than once per epoch, for long epochs: the trials validate every N
    # updates (it sets trainer.val_every_n_updates), the pruner's steps count updates, and
    # its epoch settings (n_warmup_steps, min_resource, Hyperband's budget) are turned into
    # updates with the trial's updates per epoch. None: once per epoch.
    report_every_n_updates: int | None = None
    min_resource: int = 1  # successive_halving / hyperband: epochs before the first rung
    reduction_factor: int = 3  # successive_halving / hyperband
    # While a trial runs its search stamps it with its clock every heartbeat_s seconds; a
    # trial of a search on another host is released once its stamp is grace_s old (clocks
    # within grace_s of each other) and did not move while this search waited to make sure.
    heartbeat_s: float = 30.0
    # Long-lived worker processes that run trial after trial, keeping imports and datasets
    # between trials. None: search.n_jobs of them when n_jobs > 1 on this machine, else 0.
    # 0: each trial is a job of the launcher (the mode for SLURM/submitit). N: N trials at a
    # time, each slot with its own worker.
    workers: int | None = None
    # Seconds a trial may run on a worker before the worker is killed, the trial recorded as
    # failed and a fresh worker started; None: no limit.
    trial_timeout: float | None = None
    # A worker whose resident memory passed this after a trial is replaced by a fresh one.
    worker_memory_mb: float = 4096.0
    grace_s: float = 300.0
    # Set by the sweeper on each job: the trial this run reports to. Not for the command line.
    trial: int | None = None

    def validate(self) -> SearchSettings:
        if self.sampler not in SAMPLERS:
            raise BprunError(
                f"search.sampler={self.sampler} is not known: use one of {', '.join(SAMPLERS)}"
            )
        if self.pruner not in PRUNERS:
            raise BprunError(
                f"search.pruner={self.pruner} is not known: use one of {', '.join(PRUNERS)}"
            )
        for key in ("n_trials", "n_jobs", "min_resource", "reduction_factor"):
            if getattr(self, key) < (2 if key == "reduction_factor" else 1):
                low = 2 if key == "reduction_factor" else 1
                raise BprunError(f"search.{key}={getattr(self, key)}: must be at least {low}")
        for key in ("n_startup_trials", "pruner_startup_trials", "n_warmup_steps"):
            if getattr(self, key) < 0:
                raise BprunError(f"search.{key}={getattr(self, key)}: must be 0 or more")
        if not self.heartbeat_s > 0:
            raise BprunError(f"search.heartbeat_s={self.heartbeat_s}: must be more than 0")
        if not self.grace_s >= 2 * self.heartbeat_s:
            raise BprunError(
                f"search.grace_s={self.grace_s}: must be at least twice search.heartbeat_s "
                f"({self.heartbeat_s}), or a live search's trials could be taken for stopped"
            )
        if self.report_every_n_updates is not None and self.report_every_n_updates < 1:
            raise BprunError(
                f"search.report_every_n_updates={self.report_every_n_updates}: must be at least "
                "1 (leave it unset to report once per epoch)"
            )
        if self.workers is not None and self.workers < 0:
            raise BprunError(f"search.workers={self.workers}: must be 0 or more")
        if self.trial_timeout is not None and not self.trial_timeout > 0:
            raise BprunError(
                f"search.trial_timeout={self.trial_timeout}: must be more than 0 seconds "
                "(leave it unset for no limit)"
            )
        if not self.worker_memory_mb > 0:
            raise BprunError(
                f"search.worker_memory_mb={self.worker_memory_mb}: must be more than 0"
            )
        if not 0.0 < self.percentile < 100.0:
            raise BprunError(f"search.percentile={self.percentile}: must lie in (0, 100)")
        if not self.study_name:
            raise BprunError("search.study_name is empty: give the study a name")
        return self

    def check_epochs(self, max_epochs: int) -> None:
        """Pruner settings that could never stop a trial before trainer.max_epochs. (With one
        epoch there is nothing to stop early whatever the warm-up: not an error.)"""
        if self.pruner in ("successive_halving", "hyperband") and self.min_resource >= max_epochs:
            raise BprunError(
                f"search.pruner={self.pruner} with min_resource={self.min_resource} has its "
                f"first rung at epoch {self.min_resource}, not before the last of "
                f"trainer.max_epochs={max_epochs}: no trial could be stopped early; lower "
                "search.min_resource"
            )
        if self.pruner in ("median", "percentile") and 1 < max_epochs <= self.n_warmup_steps:
            raise BprunError(
                f"search.n_warmup_steps={self.n_warmup_steps} is not below "
                f"trainer.max_epochs={max_epochs}: no trial could be pruned; lower it"
            )
