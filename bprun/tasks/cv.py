"""`task=cv`: k-fold cross-validation. Each fold is a training run in its own folder
(`fold_<k>/`, with its metrics.json, checkpoints and the rows it validated on), the fold's
validation part taken from the source's training pool by `bprun.data.folds`; this run's folder
gets `cv.json` and `cv.csv`: each metric's per-fold values, mean and standard deviation."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import statistics
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from bprun.data.choice import source_params
from bprun.errors import BprunError
from bprun.io import atomic_write, write_json
from bprun.overrides import key_of

log = logging.getLogger("bprun")


def check(cfg: DictConfig) -> dict:
    """The cv settings, checked before any fold trains."""
    cv = OmegaConf.to_container(cfg.cv, resolve=True)
    folds = cv.get("folds")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise BprunError(f"cv.folds must be a whole number of at least 2, got {folds!r}")
    if not isinstance(cv.get("seed"), int) or isinstance(cv.get("seed"), bool):
        raise BprunError(f"cv.seed must be a whole number, got {cv.get('seed')!r}")
    target = cfg.dataset.get("_target_") or ""
    if "fold" not in source_params({"_target_": target}):
        raise BprunError(
            f"task=cv splits a source's training pool into folds, which {target or 'this dataset'}"
            " does not take: use dataset=table or dataset=image_folder"
        )
    if cfg.trainer.get("resume"):
        raise BprunError("task=cv runs every fold from the start: drop trainer.resume")
    return cv


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] = ()) -> float | None:
    """Train one model per fold; returns the monitored metric's mean over the folds."""
    from bprun.tasks import train

    cv = check(cfg)
    run_dir = Path(run_dir)
    monitor, folds = cfg.trainer.monitor, cv["folds"]
    how = f"grouped by {cv['group']}" if cv["group"] else "stratified by class where it classifies"
    log.info(f"{folds}-fold cross-validation ({how}); fold folders {run_dir}/fold_<k>")
    results = []
    for k in range(folds):
        fold_cfg = cfg.copy()
        with open_dict(fold_cfg):
            fold_cfg.task = "train"
            fold_cfg.dataset.fold = {
                "k": k,
                "folds": folds,
                "seed": cv["seed"],
                "group": cv["group"],
            }
        log.info(f"fold {k + 1}/{folds}")
        fold_dir = run_dir / f"fold_{k}"
        train.run(fold_cfg, fold_dir, fold_overrides(overrides, fold_cfg.dataset.fold))
        results.append(json.loads((fold_dir / "metrics.json").read_text()))
    table = aggregate(results, monitor)
    write_json({"folds": folds, "group": cv["group"], "monitor": monitor, "metrics": table},
               run_dir / "cv.json")  # fmt: skip
    write_csv(table, run_dir / "cv.csv")
    log.info(render(table, folds))
    mean = (table.get(monitor) or {}).get("mean")
    return mean if mean is not None and math.isfinite(mean) else None


def fold_overrides(overrides: list[str], fold) -> list[str]:
    """The command line of one fold as a training run, so `trainer.resume=<fold folder>`
    continues that fold alone."""
    group = "null" if fold.group is None else f"'{fold.group}'"
    spec = f"{{k:{fold.k},folds:{fold.folds},seed:{fold.seed},group:{group}}}"
    return [*(o for o in overrides if key_of(o) != "task"), "task=train", f"+dataset.fold={spec}"]


def aggregate(results: list[dict], monitor: str) -> dict[str, dict]:
    """metric -> {"folds": [per-fold values], "mean", "std"}: each fold's best validation
    metrics (the epoch its monitor chose) and its test metrics."""
    names: dict[str, None] = {}
    rows = []
    for r in results:
        row = {k: v for k, v in (r.get("best") or {}).items() if k.startswith("val")}
        row.update(r.get("test") or {})
        rows.append(row)
        names.update(dict.fromkeys(row))
    table = {}
    for name in names:
        values = [row.get(name) for row in rows]
        present = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        table[name] = {
            "folds": values,
            "mean": statistics.fmean(present) if present else None,
            "std": statistics.stdev(present) if len(present) > 1 else 0.0,
        }
    return table


def write_csv(table: dict, path: Path) -> None:
    folds = max((len(v["folds"]) for v in table.values()), default=0)
    text = io.StringIO()
    w = csv.writer(text)
    w.writerow(["metric", *(f"fold_{k}" for k in range(folds)), "mean", "std"])
    for name, v in table.items():
        w.writerow([name, *v["folds"], v["mean"], v["std"]])
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def render(table: dict, folds: int) -> str:
    width = max((len(n) for n in table), default=6)
    head = f"{'metric':<{width}}" + "".join(f"{f'fold {k}':>10}" for k in range(folds))
    lines = [f"cross-validation, {folds} folds", head + f"{'mean ± std':>20}"]
    for name, v in table.items():
        cells = "".join(f"{x:>10.4f}" if x is not None else f"{'-':>10}" for x in v["folds"])
        mean = f"{v['mean']:.4f} ± {v['std']:.4f}" if v["mean"] is not None else "-"
        lines.append(f"{name:<{width}}{cells}{mean:>20}")
    return "\n".join(lines)
