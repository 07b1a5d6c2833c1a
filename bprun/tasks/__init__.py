"""What a run does, by `task=`: each task is a module with

    run(cfg, run_dir, overrides) -> float | None

(the value a sweeper optimises, or None). A task module is imported only when
chosen, so the command line validates the config before torch loads.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from bprun.errors import BprunError

if TYPE_CHECKING:  # `bprun --help` reads TASKS without loading omegaconf
    from omegaconf import DictConfig

# task name -> (module, what it does), as `bprun --help` lists them.
TASKS = {
    "train": ("bprun.tasks.train", "fit, test with the best weights, write metrics.json"),
    "eval": ("bprun.tasks.eval", "test a saved run (ckpt=<run folder or .pt>), write eval.json"),
    "predict": (
        "bprun.tasks.predict",
        "forecast the horizon after each series' end (ckpt=<run>), write forecast.csv",
    ),
    "backtest": (
        "bprun.tasks.backtest",
        "walk-forward test of a forecaster over backtest.folds origins, write backtest.csv",
    ),
    "recommend": (
        "bprun.tasks.recommend",
        "top-k unseen items per user of a saved recommender (ckpt=<run>), as a CSV",
    ),
    "gradcheck": ("bprun.tasks.gradcheck", "check autograd against finite differences"),
    "lr_find": ("bprun.tasks.lr_find", "learning-rate range test, plot and suggestion"),
    "cv": (
        "bprun.tasks.cv",
        "k-fold cross-validation (cv.folds, cv.group): one run per fold, mean and std",
    ),
    "generate": (
        "bprun.tasks.generate",
        "sample text from a language model (ckpt=<run>), write samples.txt",
    ),
    "export": (
        "bprun.tasks.export",
        "a run's weights as one file (ckpt=<run>, export.format=pt|safetensors)",
    ),
    "meta": (
        "bprun.tasks.meta",
        "MAML on a task distribution (dataset=sine_tasks), write metrics.json",
    ),
}


def run_task(cfg: DictConfig, run_dir: Path, overrides: list[str] = ()) -> float | None:
    if cfg.task not in TASKS:
        raise BprunError(f"task='{cfg.task}' is not known: use task={' or '.join(TASKS)}")
    module = importlib.import_module(TASKS[cfg.task][0])
    return module.run(cfg, run_dir, list(overrides))
