"""Reading a search's study back in tests."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.trial import TrialState

optuna.logging.set_verbosity(optuna.logging.WARNING)

# A small search: the MLP on MNIST-1D, a few epochs a trial, one thread a job.
FAST = ["trainer.max_epochs=4", "trainer.checkpoint.save_top_k=1", "model.hidden=[64]"]


def load(storage: str | Path, name: str) -> optuna.Study:
    if "://" not in str(storage):
        from optuna.storages.journal import JournalFileBackend

        storage = optuna.storages.JournalStorage(JournalFileBackend(str(storage)))
    return optuna.load_study(study_name=name, storage=storage)


def counted(study) -> list:
    """The trials that take one of the study's n_trials slots."""
    return [t for t in study.get_trials() if "bprun.released" not in t.user_attrs]


def finished(study) -> list:
    return [t for t in counted(study) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def param_sets(trials) -> list:
    return [tuple(sorted(t.params.items())) for t in trials]
