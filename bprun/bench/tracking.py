"""What tracking costs a training epoch: the shipped CNN on MNIST-1D with each set of
trackers, against the same fit with none.

    python -m bprun.bench.tracking [--epochs 4] [--rounds 5] [--threads 1]
        [--variants tensorboard;tensorboard,mlflow,csv]

Every variant trains a fresh copy of the same initial weights for the same epochs
(with validation, so epoch metrics are logged as in a real run), the variants
taking turns within every round; each round gives a variant's seconds per epoch
(the epochs after the first) over the untracked fit's, and the median over rounds
is reported. The first epoch is reported apart: it also carries the start of the
trackers' runs (MLflow creates its run and logs the parameters on its thread). MLflow writes to
an SQLite store in a temporary folder; it is imported before the timing (a run's
start-up, not an epoch, pays for that). The end of a run, which waits for the
trackers to flush, is timed apart.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from bprun.build import build_data, build_loss, build_model, build_optimizer
from bprun.config import register_configs
from bprun.engine import Callback, Trainer
from bprun.tracking.trackers import open_trackers


class EpochEnds(Callback):
    """When each epoch ended."""

    def __init__(self):
        self.times: list[float] = []

    def on_epoch_end(self, trainer, metrics: dict) -> None:
        self.times.append(time.perf_counter())


def fit(cfg, data, initial, settings, trackers_cfg, folder: Path, device) -> tuple:
    """(seconds of each epoch after the first, of the first epoch, of the end of the run,
    which waits for the trackers to flush)."""
    model = copy.deepcopy(initial)
    tracker = open_trackers(trackers_cfg, folder) if trackers_cfg is not None else None
    ends = EpochEnds()
    trainer = Trainer(
        settings,
        model,
        build_loss(cfg.loss, data.dataset.task),
        build_optimizer(cfg.optim, model),
        device=device,
        task=data.dataset.task,
        num_classes=data.dataset.num_classes,
        tracker=tracker,
        callbacks=[ends],
    )
    if tracker is not None:
        tracker.text("config", OmegaConf.to_yaml(trackers_cfg))  # as task=train does
    ends.times.append(time.perf_counter())
    trainer.fit(data.train, data.val)
    first = ends.times[1] - ends.times[0]
    later = (ends.times[-1] - ends.times[1]) / (len(ends.times) - 2)
    t = time.perf_counter()
    if tracker is not None:
        summary = {"status": "completed", "run_dir": str(folder), "updates": trainer.update}
        tracker.finish(trackers_cfg, {**summary, "best": trainer.best, "monitor": "val/loss"})
        tracker.close()
    return later, first, time.perf_counter() - t


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default="tensorboard;tensorboard,mlflow,csv")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    register_configs()
    variants = [v.strip() for v in args.variants.split(";") if v.strip()]
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    with initialize_config_module("bprun.conf", version_base="1.3"):
        cfg = compose("config", overrides=["model=cnn", f"paths.output_dir={root}"])
        tracked = {
            v: compose(
                "config", overrides=["model=cnn", f"tracker=[{v}]", f"paths.output_dir={root}"]
            )
            for v in variants
        }
    if any("mlflow" in v for v in variants):
        import mlflow  # noqa: F401  (start-up, not the epoch)
    device = torch.device(args.device)
    data = build_data(cfg.dataset, device, seed=0)
    torch.manual_seed(0)
    initial = build_model(cfg.model, data.dataset).to(device)
    settings = OmegaConf.to_object(cfg.trainer)
    settings.max_epochs, settings.progress, settings.threads = args.epochs, False, None
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), MNIST-1D CNN, {args.epochs} "
        f"epochs x {args.rounds} rounds ({len(data.train)} updates an epoch, validation "
        f"each epoch, log every {settings.log_every_n_updates} updates), {device}"
    )
    names = ["none", *variants]
    rows: list[dict] = []
    n = 0
    for r in range(args.rounds + 1):  # round 0 warms up (and creates the MLflow store)
        row = {}
        for name in names:
            n += 1
            folder = root / f"{n:03d}"
            folder.mkdir()
            row[name] = fit(cfg, data, initial, settings, tracked.get(name), folder, device)
        if r:
            rows.append(row)

    def median(name, i, ratio=False):
        return statistics.median(row[name][i] / (row["none"][i] if ratio else 1.0) for row in rows)

    print(
        f"{'trackers':<24} {'s/epoch':>8} {'vs none':>8} {'1st epoch s':>12} "
        f"{'vs none':>8} {'end of run s':>12}"
    )
    for name in names:
        print(
            f"{name:<24} {median(name, 0):>8.3f} {median(name, 0, True):>8.3f} "
            f"{median(name, 1):>12.3f} {median(name, 1, True):>8.3f} {median(name, 2):>12.3f}"
        )
    tmp.cleanup()


if __name__ == "__main__":
    main()
