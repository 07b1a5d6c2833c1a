"""Benchmark: bprun's engine against a hand-written PyTorch loop on the same batches.

    python -m bprun.bench [--updates 100] [--rounds 12] [--threads 1] [--full]
    python -m bprun.bench --techniques     # activation checkpointing and EMA (bench/techniques.py)
    python -m bprun.bench --ddp [--devices 2] [--device cpu]   (see ddp.py)
    python -m bprun.bench --data      the data paths (bprun/bench/data.py)

For each model on MNIST-1D (the shipped `mlp` and `cnn` configs, and
`paper_cnn`, the 5,210-parameter CNN of `+experiment=mnist1d_paper_cnn`, where
the optimizer step is a large share of the update) the engine and the plain
loop train a fresh copy of the same initial weights for the same number of
updates over the same batches, in many short rounds that rotate which loop
goes first. Each round gives a ratio of throughputs measured within a second
of each other, so a slow spell of a shared machine hits both sides of it; the
median over rounds is reported with its interquartile range. The plain loop
runs twice: with the optimizer as a user constructs it (`torch.optim.Adam(params,
lr=...)`, torch's default kernel), and with the kernel bprun picks
(`optim.impl=auto`: fused Adam on the CPU), the engine's own. The engine runs with
its defaults (features off), then with gradient clipping, each against the
plain loop doing the same work; `--full` adds bf16-mixed autocast and more
rounds (bf16 convolutions on a CPU are slow: the full run takes about 15
minutes on 2 cores, the default about two).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from bprun.build import OPTIM_KEYS, build_data, build_loss, build_model, build_optimizer
from bprun.config import register_configs
from bprun.engine import Trainer, TrainerSettings
from bprun.engine.settings import GradClip
from bprun.optim import impl_of


def plain_loop(model, loss_fn, optimizer, x, y, batch_size, updates, seed, clip=None, dtype=None):
    """What a user writes by hand: permutation, slices, forward, backward, step."""
    model.train()
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    n, done, epoch = len(x), 0, 0
    while done < updates:
        g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
        perm = torch.randperm(n, generator=g).to(x.device)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            if dtype is None:
                loss = loss_fn(model(x[idx]), y[idx])
            else:
                with torch.autocast(x.device.type, dtype=dtype):
                    loss = loss_fn(model(x[idx]), y[idx])
            if scaler is None:
                loss.backward()
                if clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad(set_to_none=True)
            done += 1
            if done == updates:
                break
        epoch += 1
    return loss.detach().item()  # one sync at the end, as the engine does


def engine_loop(settings, model, loss_fn, optimizer, data, device):
    trainer = Trainer(
        settings,
        model,
        loss_fn,
        optimizer,
        device=device,
        task=data.dataset.task,
        num_classes=data.dataset.num_classes,
    )
    trainer.fit(data.train, None)


def measure(cfg, variant: dict, updates: int, rounds: int, device: torch.device):
    data = build_data(cfg.dataset, device, seed=0)
    torch.manual_seed(0)
    initial = build_model(cfg.model, data.dataset).to(device)
    loss_fn = build_loss(cfg.loss, data.dataset.task)
    settings = TrainerSettings(
        max_epochs=10**6,
        max_updates=updates,
        progress=False,
        log_every_n_updates=50,
        device=str(device),
        **variant,
    )
    clip = settings.grad_clip.max
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(settings.precision)

    def fresh(default_optimizer: bool = False):
        model = copy.deepcopy(initial)
        if default_optimizer:
            return model, user_optimizer(cfg.optim, model)
        return model, build_optimizer(cfg.optim, model)

    def timed(run, default_optimizer: bool = False) -> float:
        model, opt = fresh(default_optimizer)
        sync(device)
        t = time.perf_counter()
        run(model, opt)
        sync(device)
        return updates / (time.perf_counter() - t)

    def engine(model, opt):
        engine_loop(settings, model, loss_fn, opt, data, device)

    def plain(model, opt):
        train = data.train
        plain_loop(
            model,
            loss_fn,
            opt,
            train.x,
            train.y,
            train.batch_size,
            updates,
            train.seed,
            clip,
            dtype,
        )

    runs = {
        "engine": lambda: timed(engine),
        "plain": lambda: timed(plain, default_optimizer=True),
        "plain_impl": lambda: timed(plain),
    }
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds + 1):  # round 0 warms up caches and allocators
        # Rotate which loop goes first, so none gains from its place in the round.
        order = list(runs)[r % 3 :] + list(runs)[: r % 3]
        got = {name: runs[name]() for name in order}
        if r > 0:
            for name, rate in got.items():
                rates[name].append(rate)
    return rates


def user_optimizer(node, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer as a hand-written script builds it: the class and its arguments, torch's
    default kernel (no fused/foreach flag), bprun's own keys left out."""
    args = OmegaConf.to_container(node, resolve=True)
    for key in OPTIM_KEYS:
        args.pop(key, None)
    return instantiate(args)(params=model.parameters())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# bench model name -> the overrides that compose it
MODELS = {
    "mlp": ["model=mlp"],
    "cnn": ["model=cnn"],
    "paper_cnn": ["+experiment=mnist1d_paper_cnn"],
}

VARIANTS = {
    "features off": {},
    "grad clip": {"grad_clip": GradClip("norm", 1.0)},
    "bf16-mixed": {"precision": "bf16-mixed"},
    "16-mixed": {"precision": "16-mixed"},  # CUDA only: GradScaler on both sides
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=None, help="default 100 (200: --techniques)")
    parser.add_argument("--rounds", type=int, default=None, help="default 12, 20 with --full")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    parser.add_argument("--variants", default=None, help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--full", action="store_true", help="bf16-mixed too, 20 rounds")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--techniques",
        action="store_true",
        help="instead: step-time ratios and memory of activation checkpointing and EMA",
    )
    parser.add_argument("--ddp", action="store_true", help="N ranks against one process")
    parser.add_argument("--devices", type=int, default=2, help="ranks for --ddp")
    parser.add_argument("--epochs", type=int, default=4, help="epochs for --ddp")
    parser.add_argument("--batch", type=int, default=64, help="per-rank batch for --ddp")
    parser.add_argument("--data-dir", default="data", help="dataset cache for --ddp")
    parser.add_argument(
        "--command",
        action="store_true",
        help="the whole `bprun` command against plain scripts (and Lightning, if installed)",
    )
    data = parser.add_argument_group("--data: the data paths (see bprun/bench/data.py)")
    data.add_argument("--data", action="store_true", help="benchmark the data paths instead")
    data.add_argument("--images", type=int, default=2048)
    data.add_argument("--image-size", type=int, default=32)
    data.add_argument("--batch-size", type=int, default=64)
    data.add_argument("--workers", type=int, default=2)
    args, rest = parser.parse_known_args(argv)
    if args.data:
        from bprun.bench import data as bench_data

        args.rounds = args.rounds or 5
        return bench_data.main(args)
    if args.command:
        from bprun.bench.command import main as command_main

        if args.updates is not None:
            rest = [f"--updates={args.updates}", *rest]
        return command_main(rest, device=args.device, threads=args.threads, rounds=args.rounds)
    if args.ddp:
        from bprun.bench.ddp import main as ddp

        return ddp(args)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.updates is None:  # the default run takes about two minutes on 2 cores
        args.updates = 200 if args.techniques or args.full else 100
    if args.techniques:
        from bprun.bench import techniques

        torch.set_num_threads(args.threads)
        models = "mlp,deep_mlp,cnn" if args.models == ",".join(MODELS) else args.models
        techniques.run(args.updates, args.rounds or 5, models, torch.device(args.device))
        return
    if args.rounds is None:
        args.rounds = 20 if args.full else 12
    if args.variants is None:
        args.variants = "features off,grad clip" + (",bf16-mixed" if args.full else "")
    torch.set_num_threads(args.threads)
    register_configs()
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.updates} updates x "
        f"{args.rounds} rounds, MNIST-1D, {device}; ratio: median over rounds [quartiles]"
    )
    with initialize_config_module("bprun.conf", version_base="1.3"):
        for name in args.models.split(","):
            if name not in MODELS:
                parser.error(f"--models: {name} is not one of {', '.join(MODELS)}")
            cfg = compose("config", overrides=[*MODELS[name], "dataset=mnist1d"])
            if name == args.models.split(",")[0]:
                probe = torch.nn.Linear(1, 1).to(device)
                impl = impl_of(build_optimizer(cfg.optim, probe).param_groups)
                print(
                    f"engine and plain+impl: optim={cfg.optim._target_} with optim.impl=auto -> "
                    f"{impl}; plain: torch's default kernel"
                )
                print(
                    f"{'model':<9} {'variant':<13} {'engine upd/s':>12} {'plain upd/s':>11} "
                    f"{'ratio':>19} {'plain+impl upd/s':>16} {'ratio':>19}"
                )
            for variant in args.variants.split(","):
                rates = measure(cfg, VARIANTS[variant], args.updates, args.rounds, device)
                engine = rates["engine"]
                ratios = [
                    spread([e / p for e, p in zip(engine, rates[other], strict=True)])
                    for other in ("plain", "plain_impl")
                ]
                print(
                    f"{name:<9} {variant:<13} {statistics.median(engine):>12.1f} "
                    f"{statistics.median(rates['plain']):>11.1f} {ratios[0]:>19} "
                    f"{statistics.median(rates['plain_impl']):>16.1f} {ratios[1]:>19}",
                    flush=True,
                )


def spread(ratios: list[float]) -> str:
    """The median ratio and its quartiles: '1.123 [1.08-1.15]'."""
    if len(ratios) < 4:
        return f"{statistics.median(ratios):.3f}"
    q1, q2, q3 = statistics.quantiles(ratios, n=4)
    return f"{q2:.3f} [{q1:.2f}-{q3:.2f}]"


if __name__ == "__main__":
    main()
