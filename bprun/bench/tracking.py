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
    """When each epoch ended: wall time, and CPU time of the whole process (the trackers'
    threads included), which a machine shared with other work disturbs less."""

    def __init__(self):
        self.times: list[tuple[float, float]] = []

    def mark(self) -> None:
        self.times.append((time.perf_counter(), time.process_time()))

    def on_epoch_end(self, trainer, metrics: dict) -> None:
        self.mark()


class Recorder:
    """A tracker that keeps what the trainer logs, to replay it."""

    def __init__(self):
        self.calls: list[tuple[dict, int, float]] = []

    def log(self, scalars: dict, step: int) -> None:
        self.calls.append((dict(scalars), step, time.perf_counter()))


def replay(calls: list, epochs: int, trackers_cfg, folder: Path, repeat: int) -> float:
    """CPU seconds per epoch that the trackers spend on one epoch's events (all threads,
    until every event is sent), once their runs are open. The events come at the moments
    of the fit they were recorded in, so the workers gather them as in training."""
    tracker = open_trackers(trackers_cfg, folder)
    tracker.text("config", "-")
    while not all(w._started and not w._queue and not w._inflight for w in tracker.workers):
        time.sleep(0.01)
    t = time.process_time()
    for r in range(repeat):
        begun = time.perf_counter()
        for scalars, step, at in calls:  # at the moments of the fit
            time.sleep(max(0.0, at - calls[0][2] - (time.perf_counter() - begun)))
            tracker.log(scalars, step + r * 10**6)
    while any(w._queue or w._inflight for w in tracker.workers):
        time.sleep(0.01)
    cpu = (time.process_time() - t) / (epochs * repeat)
    tracker.close()
    return cpu


def fit(cfg, data, initial, settings, trackers_cfg, folder: Path, device, tracker=None) -> tuple:
    """(seconds of each epoch after the first, CPU seconds of each, seconds of the first
    epoch, of the end of the run, which waits for the trackers to flush)."""
    model = copy.deepcopy(initial)
    if trackers_cfg is not None:
        tracker = open_trackers(trackers_cfg, folder)
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
    if trackers_cfg is not None:
        tracker.text("config", OmegaConf.to_yaml(trackers_cfg))  # as task=train does
    ends.mark()
    trainer.fit(data.train, data.val)
    (w0, _), (w1, c1), (wn, cn) = ends.times[0], ends.times[1], ends.times[-1]
    later, cpu = (wn - w1) / (len(ends.times) - 2), (cn - c1) / (len(ends.times) - 2)
    first = w1 - w0
    t = time.perf_counter()
    if trackers_cfg is not None:
        summary = {"status": "completed", "run_dir": str(folder), "updates": trainer.update}
        tracker.finish(trackers_cfg, {**summary, "best": trainer.best, "monitor": "val/loss"})
        tracker.close()
    return later, cpu, first, time.perf_counter() - t


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default="tensorboard;tensorboard,mlflow,csv")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--replay", type=int, default=5)
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

    recorder = Recorder()
    fit(cfg, data, initial, settings, None, root, device, recorder)
    untracked = median("none", 1)
    print(
        f"\nthe trackers' own CPU time for one epoch's events ({len(recorder.calls)} log calls "
        f"in {args.epochs} epochs), all threads, replayed {args.replay} times:"
    )
    for name in variants:
        folder = root / f"replay_{name.replace(',', '_')}"
        folder.mkdir()
        cpu = replay(recorder.calls, args.epochs, tracked[name], folder, args.replay)
        print(
            f"{name:<24} {cpu * 1000:>8.2f} ms CPU an epoch, {cpu / untracked:.2%} of the "
            f"untracked epoch's {untracked:.3f} s CPU"
        )
    print()
    print(
        f"{'trackers':<24} {'s/epoch':>8} {'vs none':>8} {'cpu s/epoch':>12} {'vs none':>8} "
        f"{'1st epoch s':>12} {'vs none':>8} {'end of run s':>12}"
    )
    for name in names:
        print(
            f"{name:<24} {median(name, 0):>8.3f} {median(name, 0, True):>8.3f} "
            f"{median(name, 1):>12.3f} {median(name, 1, True):>8.3f} "
            f"{median(name, 2):>12.3f} {median(name, 2, True):>8.3f} {median(name, 3):>12.3f}"
        )
    tmp.cleanup()


if __name__ == "__main__":
    main()
