"""What the training-time instruments cost: updates/s with each one on, against all off.

    python -m bprun.bench.instruments [--updates 400] [--rounds 5] [--threads 1] [--device cpu]

The shipped MNIST-1D MLP (`bprun` defaults) trains a fresh copy of the same
initial weights for the same updates with each variant, the variants taking
turns within every round; each round gives the ratio of a variant's updates/s
to the all-off run of that round, and the median over rounds is reported. The
runs log to TensorBoard in a temporary folder every `--log-every` updates, as a
real run does.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import tempfile
import time

import torch
from hydra import compose, initialize_config_module

from bprun.build import build_data, build_loss, build_model, build_optimizer, build_problem
from bprun.config import register_configs
from bprun.diagnostics import diagnostic_callbacks
from bprun.engine import Trainer, TrainerSettings
from bprun.engine.settings import GradWatch
from bprun.tracking.tensorboard import Tracker

VARIANTS = {
    "off": {},
    "grad norms": {"log_grad_norms": True},
    "grad watch": {"grad_watch": GradWatch(vanish_below=1e-6, explode_above=1e3)},
    "dead units": {"dead_units": True},
    "all": {
        "log_grad_norms": True,
        "grad_watch": GradWatch(vanish_below=1e-6, explode_above=1e3),
        "dead_units": True,
    },
}


def rate(cfg, data, initial, settings: TrainerSettings, run_dir: str, device) -> float:
    """Updates per second of one fit with `settings`, callbacks included (the fit ends with a
    host read of the losses, so queued device work is inside the timing)."""
    model = copy.deepcopy(initial)
    trainer = Trainer(
        settings,
        model,
        build_loss(cfg.loss, build_problem(None, data.dataset)),
        build_optimizer(cfg.optim, model),
        device=device,
        num_classes=data.dataset.num_classes,
        callbacks=diagnostic_callbacks(settings, run_dir),
        tracker=Tracker(run_dir),
    )
    t = time.perf_counter()
    trainer.fit(data.train, None)
    seconds = time.perf_counter() - t
    trainer.tracker.close()
    return settings.max_updates / seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    register_configs()
    with initialize_config_module("bprun.conf", version_base="1.3"):
        cfg = compose("config")
    device = torch.device(args.device)
    data = build_data(cfg.dataset, device, seed=0)
    torch.manual_seed(0)
    initial = build_model(cfg.model, data.dataset).to(device)
    base = TrainerSettings(
        max_epochs=10**6,
        max_updates=args.updates,
        progress=False,
        log_every_n_updates=args.log_every,
    )
    names = ["off", *(v for v in args.variants.split(",") if v != "off")]
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), MNIST-1D MLP, {args.updates} "
        f"updates x {args.rounds} rounds, log every {args.log_every} updates, {device}"
    )
    ratios: dict[str, list[float]] = {n: [] for n in names}
    rates: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds + 1):  # round 0 warms up
            row = {
                n: rate(cfg, data, initial, dataclasses.replace(base, **VARIANTS[n]), tmp, device)
                for n in names
            }
            if r:
                for n in names:
                    rates[n].append(row[n])
                    ratios[n].append(row[n] / row["off"])
    print(f"{'instruments':<12} {'updates/s':>10} {'vs off':>7}")
    for n in names:
        print(f"{n:<12} {statistics.median(rates[n]):>10.1f} {statistics.median(ratios[n]):>7.3f}")


if __name__ == "__main__":
    main()
