"""What activation checkpointing and EMA cost and save, against the plain engine.

    python -m bprun.bench --techniques [--updates 200] [--rounds 5] [--models mlp,deep_mlp,cnn]
                                       [--device cpu|cuda]

For the shipped MLP and CNN and a deep MLP (8 LayerNorm/GELU blocks) on MNIST-1D the engine trains a fresh copy of the same
initial weights for the same updates, plain (features off), with
`model.activation_checkpointing=true`, and with `trainer.ema.decay=0.999`,
the variants taking turns within every round; the median over rounds of each
variant's updates/s divided by the plain run's of that round is its step-time
cost as a ratio (1.0 = free, 0.8 = 20% fewer updates per second). Beside it:
the bytes autograd keeps for one training batch's backward (saved tensors and
checkpointed block inputs), and on CUDA the peak `torch.cuda.max_memory_allocated`
of the run.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from hydra import compose, initialize_config_module

from bprun.build import build_data, build_loss, build_model, build_optimizer, build_problem
from bprun.config import register_configs
from bprun.engine import Trainer, TrainerSettings
from bprun.engine.averaging import averaging_callbacks
from bprun.engine.settings import EMA
from bprun.models.checkpointing import enable_activation_checkpointing, saved_tensor_bytes

# --models names -> config overrides on MNIST-1D
MODELS = {
    "mlp": ["model=mlp"],  # Linear -> ReLU blocks: ReLU's output is the next input, little to save
    "deep_mlp": [
        "model=mlp",
        "model.hidden=[256,256,256,256,256,256,256,256]",
        "model.norm=layer",
        "model.activation=gelu",
    ],
    "cnn": ["model=cnn"],
}

# name -> (trainer settings, activation checkpointing)
VARIANTS = {
    "plain": ({}, False),
    "act. ckpt": ({}, True),
    "ema 0.999": ({"ema": EMA(decay=0.999)}, False),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(cfg, updates: int, rounds: int, device: torch.device) -> dict:
    data = build_data(cfg.dataset, device, seed=0)
    torch.manual_seed(0)
    initial = build_model(cfg.model, data.dataset).to(device)
    loss_fn = build_loss(cfg.loss, build_problem(None, data.dataset))
    models = {}
    for name, (_, ckpt) in VARIANTS.items():
        models[name] = copy.deepcopy(initial)
        if ckpt:
            enable_activation_checkpointing(models[name])

    def timed(name: str) -> tuple[float, float | None]:
        variant, _ = VARIANTS[name]
        model = copy.deepcopy(models[name])
        s = TrainerSettings(
            max_epochs=10**6, max_updates=updates, progress=False, device=str(device), **variant
        )
        trainer = Trainer(
            s,
            model,
            loss_fn,
            build_optimizer(cfg.optim, model),
            device=device,
            num_classes=data.dataset.num_classes,
            callbacks=averaging_callbacks(s, model),
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t = time.perf_counter()
        trainer.fit(data.train, None)
        sync(device)
        rate = updates / (time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        return rate, peak

    ratios = {name: [] for name in VARIANTS}
    rates = {name: [] for name in VARIANTS}
    peaks = {}
    names = list(VARIANTS)
    for r in range(rounds + 1):  # round 0 warms up caches and allocators
        order = names[r % len(names) :] + names[: r % len(names)]
        got = {name: timed(name) for name in order}
        if r == 0:
            continue
        for name in names:
            rates[name].append(got[name][0])
            ratios[name].append(got[name][0] / got["plain"][0])
            peaks[name] = got[name][1]
    x, y = next(data.train.batches(0))
    saved = {}
    for name in names:
        model = models[name].train()
        saved[name] = saved_tensor_bytes(model, loss_fn, x, y)
        model.zero_grad(set_to_none=True)
    return {
        name: {
            "updates_per_s": statistics.median(rates[name]),
            "ratio": statistics.median(ratios[name]),
            "saved_bytes": saved[name],
            "peak_bytes": peaks[name],
        }
        for name in names
    }


def run(updates: int, rounds: int, models: str, device: torch.device) -> None:
    register_configs()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {updates} updates x "
        f"{rounds} rounds, MNIST-1D, {device}; ratio = updates/s against the plain engine"
    )
    print(
        f"{'model':<8} {'variant':<10} {'upd/s':>8} {'ratio':>7} {'saved for backward':>19} "
        f"{'CUDA peak':>10}"
    )
    with initialize_config_module("bprun.conf", version_base="1.3"):
        for model in models.split(","):
            cfg = compose("config", overrides=[*MODELS[model], "dataset=mnist1d"])
            results = measure(cfg, updates, rounds, device)
            for name, m in results.items():
                peak = f"{m['peak_bytes'] / 2**20:.1f} MiB" if m["peak_bytes"] else "-"
                print(
                    f"{model:<8} {name:<10} {m['updates_per_s']:>8.1f} {m['ratio']:>7.3f} "
                    f"{m['saved_bytes'] / 2**20:>15.2f} MiB {peak:>10}",
                    flush=True,
                )
