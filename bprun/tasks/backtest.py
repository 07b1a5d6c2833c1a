"""`task=backtest`: walk-forward evaluation of a forecaster over `backtest.folds` origins.

The span from `test_start` to the end of the series is cut into `folds` equal spans. Fold k
tests on the k-th; its training data ends where it begins (validation keeps its length just
before it), so each fold forecasts only what came after everything it learnt from. With
`backtest.window=expanding` training starts at the beginning every time, with `sliding` it
starts k spans later (a training span of constant length). `backtest.refit=true` trains one
model per fold; false trains on fold 0's span and evaluates that model at every origin (with
the scaling of its own training span). Each fold is a run folder (fold_<k>/); the folds'
test metrics go to backtest.csv, their mean and std to backtest.json, and both are printed.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from bprun.errors import BprunError
from bprun.io import write_json

log = logging.getLogger("bprun")


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] = ()) -> float | None:
    import pandas as pd

    from bprun.build import build_data

    settings = cfg.get("backtest") or {}
    folds, window, refit = (
        int(settings.get("folds", 3)),
        settings.get("window", "expanding"),
        bool(settings.get("refit", True)),
    )
    if not cfg.dataset.get("_target_", "").endswith("load_series"):
        raise BprunError("task=backtest evaluates forecasters: use dataset=series")
    if folds < 1 or window not in ("expanding", "sliding"):
        raise BprunError(
            f"backtest.folds must be at least 1 and backtest.window expanding or sliding, got "
            f"{folds} and {window}"
        )
    import torch

    spec = build_data(cfg.dataset, torch.device("cpu"), cfg.seed).dataset.state
    steps = bool(spec.get("steps"))

    def shift(t: str, n: int) -> str:
        if steps:
            return str(int(t) + n)
        from pandas.tseries.frequencies import to_offset

        return str(pd.Timestamp(t) + n * to_offset(spec["freq"]))

    if steps:
        span = int(spec["last"]) - int(spec["test_start"]) + 1
    else:
        span = len(pd.date_range(spec["test_start"], spec["last"], freq=spec["freq"]))
    length = span // folds
    if length < spec["horizon"]:
        raise BprunError(
            f"the test span holds {span} steps: too few for {folds} folds of at least "
            f"horizon={spec['horizon']}; lower backtest.folds or move dataset.test_start earlier"
        )
    rows, first_state = [], None
    for k in range(folds):
        node = copy.deepcopy(cfg)
        node.task = "train"
        d = node.dataset
        d.test_start, d.val_start = (
            shift(spec["test_start"], k * length),
            shift(spec["val_start"], k * length),
        )
        d.end = spec["last"] if k == folds - 1 else shift(spec["test_start"], (k + 1) * length - 1)
        if window == "sliding" and k:
            d.start = shift(spec["first"], k * length)
        folder = Path(run_dir) / f"fold_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        log.info(f"backtest fold {k}: test from {d.test_start} to {d.end}")
        if refit or k == 0:
            from bprun.tasks import train

            train.run(node, folder, list(overrides))
            test = json.loads((folder / "metrics.json").read_text())["test"]
            first_state = first_state or folder
        else:
            test = _evaluate(node, first_state)
            write_json({"test": test, "model": str(first_state)}, folder / "metrics.json")
        rows.append({"fold": k, "test_start": d.test_start, "end": d.end, **test})
    table = pd.DataFrame(rows)
    table.to_csv(Path(run_dir) / "backtest.csv", index=False)
    scores = [c for c in table.columns if c.startswith("test/")]
    summary = {
        c: {"mean": float(np.mean(table[c])), "std": float(np.std(table[c]))} for c in scores
    }
    write_json(
        {"folds": folds, "window": window, "refit": refit, "metrics": summary},
        Path(run_dir) / "backtest.json",
    )
    lines = [f"backtest, {folds} folds ({window} window, refit={str(refit).lower()}):"]
    for c in scores:
        lines.append(f"  {c:<18} {summary[c]['mean']:.4f} ± {summary[c]['std']:.4f}")
    log.info("\n".join(lines))
    return summary.get("test/mase", {}).get("mean")


def _evaluate(node: DictConfig, trained: Path) -> dict:
    """The test metrics of the model trained in `trained` on the data of `node`."""
    from bprun.engine import checkpoint as ckpt_io
    from bprun.tasks.setup import build_trainer, data_state, trainer_settings

    path = ckpt_io.resolve_checkpoint(trained, "backtest")
    state = ckpt_io.load_checkpoint(path)
    s = trainer_settings(node)
    s.resume = None
    trainer, data = build_trainer(node, None, s, data_state=data_state(state))
    ckpt_io.load_model_state(trainer.module, state["model"], path)
    return trainer.evaluate(data.test, "test")
