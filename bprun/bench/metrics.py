"""Benchmark: what the problem's metrics cost, as a share of a training epoch.

    python -m bprun.bench --metrics [--rounds 7] [--model cnn]

On MNIST-1D with the shipped model, each round times, interleaved: one training epoch
(no validation), a validation pass computing the problem's default metric set, and the
same pass computing the loss alone. The cost is (default - loss only) / epoch, the median
over rounds with its quartiles. The default set must cost under 3% of an epoch on the CNN.
"""

from __future__ import annotations

import statistics
import time

import torch
from hydra import compose, initialize_config_module

from bprun.build import build_data, build_loss, build_model, build_optimizer, build_problem
from bprun.config import register_configs
from bprun.engine.settings import TrainerSettings
from bprun.engine.trainer import Trainer
from bprun.problems.base import Problem


def run(model: str = "cnn", rounds: int = 7, threads: int = 1) -> dict:
    torch.set_num_threads(threads)
    register_configs()
    with initialize_config_module("bprun.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model}"])
    device = torch.device("cpu")
    data = build_data(cfg.dataset, device, seed=0)
    problem = build_problem(cfg.problem, data.dataset)
    torch.manual_seed(0)
    net = build_model(cfg.model, data.dataset, problem)
    loss = problem.criterion(build_loss(cfg.loss, problem))
    settings = TrainerSettings(max_epochs=10**6, progress=False, device="cpu")
    trainer = Trainer(settings, net, loss, build_optimizer(cfg.optim, net), problem=problem)
    loss_only = Problem()
    samples = {"epoch": [], "default": [], "loss": []}
    for r in range(rounds + 1):  # round 0 warms up
        t = time.perf_counter()
        trainer.settings.max_epochs, trainer.stop_reason = trainer.epoch + 1, None
        trainer.fit(data.train, None)
        epoch = time.perf_counter() - t
        times = {}
        for name, p in (("default", problem), ("loss", loss_only))[:: 1 if r % 2 else -1]:
            trainer.problem = p
            t = time.perf_counter()
            trainer.evaluate(data.val, "val")
            times[name] = time.perf_counter() - t
        if r:
            samples["epoch"].append(epoch)
            samples["default"].append(times["default"])
            samples["loss"].append(times["loss"])
    shares = sorted(
        (d - lo) / e
        for d, lo, e in zip(samples["default"], samples["loss"], samples["epoch"], strict=True)
    )
    q = statistics.quantiles(shares, n=4) if len(shares) > 1 else shares * 3
    result = {
        "model": model,
        "metrics": problem.selected,
        "epoch_s": statistics.median(samples["epoch"]),
        "val_default_s": statistics.median(samples["default"]),
        "val_loss_only_s": statistics.median(samples["loss"]),
        "cost_share": statistics.median(shares),
        "quartiles": (q[0], q[2]),
    }
    print(
        f"{model} on MNIST-1D ({len(data.val.x) if hasattr(data.val, 'x') else '?'} validation "
        f"examples): epoch {result['epoch_s'] * 1e3:.0f} ms; validation with the default metrics "
        f"({', '.join(problem.selected)}) {result['val_default_s'] * 1e3:.1f} ms, loss only "
        f"{result['val_loss_only_s'] * 1e3:.1f} ms\nmetrics cost {result['cost_share']:.1%} of a "
        f"training epoch (quartiles {q[0]:.1%}-{q[2]:.1%}, {rounds} rounds)"
    )
    return result
