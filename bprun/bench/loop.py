"""Benchmark: bprun's engine against a hand-written PyTorch loop on the same batches.

    python -m bprun.bench [--updates 300] [--rounds 3] [--threads 1] [--full]
    python -m bprun.bench --techniques     # activation checkpointing and EMA (bench/techniques.py)
    python -m bprun.bench --ddp [--devices 2] [--device cpu]   (see ddp.py)
    python -m bprun.bench --data      the data paths (bprun/bench/data.py)
    python -m bprun.bench --metrics   the problem's metrics against a training epoch (metrics.py)
    python -m bprun.bench --fsdp      bytes per rank under DDP, FSDP and FSDP+TP at 1, 2, 4 ranks (fsdp.py)
    python -m bprun.bench --lm        GPT training and KV-cache generation (bprun/bench/lm.py)

For each model on MNIST-1D (the shipped `mlp` and `cnn` configs, and
`paper_cnn`, the 5,210-parameter CNN of `+experiment=mnist1d_paper_cnn`, where
the optimizer step is a large share of the update) the engine and the plain
loop train fresh copies of the same initial weights over the same batches.
The plain loop runs twice: with the optimizer as a user constructs it
(`torch.optim.Adam(params, lr=...)`, torch's default kernel), and with the
kernel bprun picks (`optim.impl=auto`: fused Adam on the CPU), the engine's own.

On the CPU the three are interleaved update by update: after each engine update
(its whole loop: batch, forward, backward, step, bookkeeping) each plain loop
makes one update, in an order that rotates, and every update is timed alone.
A slow spell of a shared machine then hits all three alike: the ratio of each
chunk of 25 paired updates is one sample, and the median over chunks is
reported with its quartiles. On CUDA, where per-update timing would need a
synchronisation the engine avoids, each loop runs whole in turn per round.

The engine runs with its defaults (features off), then with gradient clipping,
each against the plain loop doing the same work; `--full` adds bf16-mixed
autocast (bf16 convolutions on a CPU are slow: about 15 minutes on 2 cores,
the default about two).
"""

from __future__ import annotations

import argparse
import collections
import copy
import itertools
import statistics
import sys
import time

import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from bprun.build import (
    OPTIM_KEYS,
    build_data,
    build_loss,
    build_model,
    build_optimizer,
    build_problem,
)
from bprun.config import register_configs
from bprun.engine import Trainer, TrainerSettings
from bprun.engine.settings import GradClip
from bprun.optim import impl_of


def plain_steps(model, loss_fn, optimizer, x, y, batch_size, seed, clip=None, dtype=None):
    """What a user writes by hand: permutation, slices, forward, backward, step. One update
    per `next()`, for as long as it is asked."""
    model.train()
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    n, epoch = len(x), 0
    while True:
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
            yield loss
        epoch += 1


class Interleave:
    """A trainer callback: after each engine update, one update of each plain loop, in an
    order that rotates; each update timed alone. The engine's time is what passes between
    two calls, its whole loop included, less the plain loops' updates."""

    def __init__(self, plains: dict):
        self.plains = plains
        self.seconds: dict[str, list[float]] = {"engine": [], **{k: [] for k in plains}}
        self.mark: float | None = None

    def on_update_end(self, trainer) -> None:
        now = time.perf_counter()
        if self.mark is not None:
            self.seconds["engine"].append(now - self.mark)
        names = list(self.plains)
        k = trainer.update % len(names)
        for name in names[k:] + names[:k]:
            t = time.perf_counter()
            next(self.plains[name])
            self.seconds[name].append(time.perf_counter() - t)
        self.mark = time.perf_counter()


def measure(cfg, variant: dict, updates: int, rounds: int, device: torch.device):
    """name -> throughputs (updates/s) of the engine ("engine"), the plain loop with the
    user's optimizer ("plain") and with bprun's kernel ("plain_impl"), paired by index:
    per chunk of CHUNK interleaved updates on the CPU, per round elsewhere."""
    data = build_data(cfg.dataset, device, seed=0)
    torch.manual_seed(0)
    initial = build_model(cfg.model, data.dataset).to(device)
    loss_fn = build_loss(cfg.loss, build_problem(None, data.dataset))
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
    train = data.train

    def plain(default_optimizer: bool):
        """A fresh copy of the initial weights trained by hand, one update per next()."""
        model = copy.deepcopy(initial)
        opt = (
            user_optimizer(cfg.optim, model)
            if default_optimizer
            else build_optimizer(cfg.optim, model)
        )
        return plain_steps(
            model, loss_fn, opt, train.x, train.y, train.batch_size, train.seed, clip, dtype
        )

    def engine(callbacks=()):
        model = copy.deepcopy(initial)
        trainer = Trainer(
            settings, model, loss_fn, build_optimizer(cfg.optim, model), device=device,
            num_classes=data.dataset.num_classes, callbacks=callbacks,
        )  # fmt: skip
        trainer.fit(train, None)

    rates: dict[str, list[float]] = {"engine": [], "plain": [], "plain_impl": []}
    for r in range(rounds + 1):  # round 0 warms up caches and allocators
        if device.type == "cpu":  # nothing asynchronous to wait for: time update by update
            interleave = Interleave({"plain": plain(True), "plain_impl": plain(False)})
            engine([interleave])
            seconds = interleave.seconds
            seconds["plain"] = seconds["plain"][1:]  # the engine's first update is not timed
            seconds["plain_impl"] = seconds["plain_impl"][1:]
            got = {
                name: [CHUNK / sum(t[i : i + CHUNK]) for i in range(0, len(t) - CHUNK + 1, CHUNK)]
                for name, t in seconds.items()
            }
        else:  # whole runs, each loop in turn, rotating which goes first
            runs = {
                "engine": engine,
                "plain": lambda: collections.deque(itertools.islice(plain(True), updates), 0),
                "plain_impl": lambda: collections.deque(itertools.islice(plain(False), updates), 0),
            }
            got = {}
            for name in list(runs)[r % 3 :] + list(runs)[: r % 3]:
                sync(device)
                t = time.perf_counter()
                runs[name]()
                sync(device)
                got[name] = [updates / (time.perf_counter() - t)]
        if r > 0:
            for name, values in got.items():
                rates[name] += values
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


CHUNK = 25  # paired updates per ratio on the CPU

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
    parser.add_argument("--updates", type=int, default=None, help="per round; default 300")
    parser.add_argument("--rounds", type=int, default=None, help="default 3, 5 with --full")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    parser.add_argument("--variants", default=None, help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--full", action="store_true", help="bf16-mixed too, 5 rounds")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--techniques",
        action="store_true",
        help="instead: step-time ratios and memory of activation checkpointing and EMA",
    )
    parser.add_argument(
        "--metrics", action="store_true", help="instead: the problem's metrics against an epoch"
    )
    parser.add_argument("--ddp", action="store_true", help="N ranks against one process")
    parser.add_argument(
        "--fsdp", action="store_true", help="instead: bytes per rank, DDP against FSDP"
    )
    parser.add_argument("--ranks", default="1,2,4", help="rank counts for --fsdp")
    parser.add_argument("--model", default="gpt", help="model for --fsdp")
    parser.add_argument(
        "--lm", action="store_true", help="GPT training and KV-cache generation (bench/lm.py)"
    )
    parser.add_argument("--new-tokens", type=int, default=500, help="generated tokens for --lm")
    parser.add_argument(
        "--search",
        action="store_true",
        help="a search with pruning off, on, and on with workers (see bprun/bench/search.py)",
    )
    parser.add_argument("--devices", type=int, default=2, help="ranks for --ddp")
    parser.add_argument("--epochs", type=int, default=4, help="epochs for --ddp")
    parser.add_argument("--batch", type=int, default=64, help="per-rank batch for --ddp")
    parser.add_argument("--data-dir", default="data", help="dataset cache for --ddp")
    parser.add_argument(
        "--command",
        action="store_true",
        help="the whole `bprun` command against plain scripts (and Lightning, if installed)",
    )
    parser.add_argument(
        "--ranking",
        action="store_true",
        help="instead: ranking evaluation of --users users against 99 negatives each",
    )
    parser.add_argument("--users", type=int, default=10000, help="users for --ranking")
    data = parser.add_argument_group("--data: the data paths (see bprun/bench/data.py)")
    data.add_argument("--data", action="store_true", help="benchmark the data paths instead")
    data.add_argument("--images", type=int, default=2048)
    data.add_argument("--image-size", type=int, default=32)
    data.add_argument("--batch-size", type=int, default=64)
    data.add_argument("--workers", type=int, default=2)
    args, rest = parser.parse_known_args(argv)
    if args.ranking:
        from bprun.bench import ranking

        args.rounds = args.rounds or 3
        return ranking.main(args)
    if args.data:
        from bprun.bench import data as bench_data

        args.rounds = args.rounds or 5
        return bench_data.main(args)
    if args.command:
        from bprun.bench.command import main as command_main

        if args.updates is not None:
            rest = [f"--updates={args.updates}", *rest]
        return command_main(rest, device=args.device, threads=args.threads, rounds=args.rounds)
    if args.metrics:
        from bprun.bench.metrics import run as metrics_bench

        model = "cnn" if args.models == ",".join(MODELS) else args.models
        return metrics_bench(model, args.rounds or 7, args.threads)
    if args.fsdp:
        from bprun.bench.fsdp import main as fsdp_bench

        return fsdp_bench(args)
    if args.search:
        from bprun.bench.search import main as search_main

        return search_main([a for a in (sys.argv[1:] if argv is None else argv) if a != "--search"])
    if args.ddp:
        from bprun.bench.ddp import main as ddp

        return ddp(args)
    if args.lm:
        from bprun.bench.lm import main as lm

        torch.set_num_threads(args.threads)
        return lm(args)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.updates is None:  # the default run takes about two minutes on 2 cores
        args.updates = 200 if args.techniques else 300
    if args.techniques:
        from bprun.bench import techniques

        torch.set_num_threads(args.threads)
        models = "mlp,deep_mlp,cnn" if args.models == ",".join(MODELS) else args.models
        techniques.run(args.updates, args.rounds or 5, models, torch.device(args.device))
        return
    if args.rounds is None:
        args.rounds = 5 if args.full else 3
    if args.device == "cpu" and args.updates <= CHUNK:
        parser.error(f"--updates: at least {CHUNK + 1} on the CPU (chunks of {CHUNK} are timed)")
    if args.variants is None:
        args.variants = "features off,grad clip" + (",bf16-mixed" if args.full else "")
    torch.set_num_threads(args.threads)
    register_configs()
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.updates} updates x "
        f"{args.rounds} rounds, MNIST-1D, {device}; ratio: median over "
        + (f"chunks of {CHUNK} interleaved updates" if device.type == "cpu" else "rounds")
        + " [quartiles]"
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
