"""Benchmark: bprun's GPT training against a hand-written nanoGPT-style loop, and generation
with the key/value cache against recomputing the context.

    python -m bprun.bench --lm [--updates 300] [--rounds 3] [--device cpu] [--full]
        [--variants 32,bf16-mixed,generate]   (default 32,generate; --full adds bf16-mixed)

Training: `experiment=char_gpt_cpu` (4 layers, 4 heads, width 128, context 64, batch 12) on
the embedded corpus. The engine (`Trainer.fit` over the window loader) and a plain loop
(nanoGPT's `get_batch`: windows sliced from the memory-mapped tokens and stacked, forward,
cross-entropy, backward, clipping at 1, AdamW with the same parameter groups and kernel) train
copies of the same initial weights on the same windows. On the CPU they are interleaved
update by update (`bprun.bench.loop.Interleave`), each chunk of 25 paired updates one sample
of the ratio; on CUDA each runs whole in turn per round. `--full` adds bf16-mixed.

Generation: `experiment=char_gpt`'s model (6 layers, width 384, context 256), 500 new tokens
from a one-token prompt, with `GPT.generate` (cache) and with the cache off (every token
recomputes the last 256 positions, as nanoGPT's `generate` does), alternated per round.
"""

from __future__ import annotations

import copy
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from torch import nn

from bprun.bench.loop import CHUNK, Interleave, spread, sync
from bprun.build import build_data, build_model, build_optimizer
from bprun.config import register_configs
from bprun.engine import Trainer, TrainerSettings
from bprun.engine.settings import GradClip
from bprun.problems.lm import FlatTokens


def plain_steps(model, optimizer, tokens, loader, device, clip=1.0, dtype=None):
    """A hand-written loop over the windows the loader would draw: one update per next()."""
    model.train()
    block = loader.block_size
    epoch = 0
    while True:
        for b in range(len(loader)):
            starts = loader.starts(epoch, b)
            x = torch.stack(
                [torch.from_numpy(tokens[i : i + block].astype(np.int64)) for i in starts]
            )
            y = torch.stack(
                [torch.from_numpy(tokens[i + 1 : i + 1 + block].astype(np.int64)) for i in starts]
            )
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(x)
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            yield loss
        epoch += 1


def measure_training(cfg, precision: str, updates: int, rounds: int, device: torch.device):
    data = build_data(cfg.dataset, device, seed=0)
    train = data.train
    torch.manual_seed(0)
    initial = build_model(cfg.model, data.dataset).to(device)
    settings = TrainerSettings(
        max_epochs=10**6,
        max_updates=updates,
        progress=False,
        log_every_n_updates=50,
        device=str(device),
        precision=precision,
        grad_clip=GradClip("norm", 1.0),
    )
    dtype = torch.bfloat16 if precision == "bf16-mixed" else None
    loss_fn = FlatTokens(nn.CrossEntropyLoss())

    def plain():
        model = copy.deepcopy(initial)
        opt = build_optimizer(cfg.optim, model)
        return plain_steps(model, opt, train.tokens, train, device, 1.0, dtype)

    def engine(callbacks=()):
        model = copy.deepcopy(initial)
        trainer = Trainer(
            settings, model, loss_fn, build_optimizer(cfg.optim, model), device=device,
            callbacks=callbacks,
        )  # fmt: skip
        trainer.fit(train, None)

    rates: dict[str, list[float]] = {"engine": [], "plain": []}
    for r in range(rounds + 1):  # round 0 warms up
        if device.type == "cpu":
            interleave = Interleave({"plain": plain()})
            engine([interleave])
            seconds = interleave.seconds
            seconds["plain"] = seconds["plain"][1:]
            got = {
                name: [CHUNK / sum(t[i : i + CHUNK]) for i in range(0, len(t) - CHUNK + 1, CHUNK)]
                for name, t in seconds.items()
            }
        else:
            got = {}
            order = ["engine", "plain"] if r % 2 == 0 else ["plain", "engine"]
            for name in order:
                sync(device)
                t = time.perf_counter()
                if name == "engine":
                    engine()
                else:
                    steps = plain()
                    for _ in range(updates):
                        next(steps)
                sync(device)
                got[name] = [updates / (time.perf_counter() - t)]
        if r > 0:
            for name, values in got.items():
                rates[name] += values
    return rates


def measure_generation(cfg, new_tokens: int, rounds: int, device: torch.device):
    """Seconds per sample of `new_tokens` tokens: (with the cache, recomputing), per round."""
    block = int(cfg.dataset.block_size)
    import types

    shape = types.SimpleNamespace(input_shape=(block,), num_classes=96)
    torch.manual_seed(0)
    model = build_model(cfg.model, shape).to(device).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    times: dict[str, list[float]] = {"cache": [], "recompute": []}
    for r in range(rounds + 1):
        for name in ("cache", "recompute") if r % 2 else ("recompute", "cache"):
            g = torch.Generator(device=device).manual_seed(0)
            sync(device)
            t = time.perf_counter()
            model.generate(prompt, new_tokens, top_k=200, generator=g, use_cache=name == "cache")
            sync(device)
            if r > 0:
                times[name].append(time.perf_counter() - t)
    return times


def main(args) -> None:
    register_configs()
    device = torch.device(args.device)
    updates = args.updates or 300
    rounds = args.rounds or 3
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {updates} updates x {rounds} "
        f"rounds, experiment=char_gpt_cpu on the embedded corpus, {device}; ratio: median over "
        + (f"chunks of {CHUNK} interleaved updates" if device.type == "cpu" else "rounds")
        + " [quartiles]"
    )
    data_dir = f"paths.data_dir={args.data_dir}"
    with initialize_config_module("bprun.conf", version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=char_gpt_cpu", data_dir])
        parts = (args.variants or "32,generate" + (",bf16-mixed" if args.full else "")).split(",")
        unknown = set(parts) - {"32", "bf16-mixed", "generate"}
        if unknown:
            raise SystemExit(f"--variants for --lm: 32, bf16-mixed, generate (not {unknown})")
        print(f"{'precision':<12} {'engine upd/s':>12} {'plain upd/s':>11} {'ratio':>19}")
        for precision in [p for p in ("32", "bf16-mixed") if p in parts]:
            rates = measure_training(cfg, precision, updates, rounds, device)
            ratios = [e / p for e, p in zip(rates["engine"], rates["plain"], strict=True)]
            print(
                f"{precision:<12} {statistics.median(rates['engine']):>12.1f} "
                f"{statistics.median(rates['plain']):>11.1f} {spread(ratios):>19}",
                flush=True,
            )
        if "generate" not in parts:
            return
        gen = compose("config", overrides=["+experiment=char_gpt", data_dir])
        new = args.new_tokens
        times = measure_generation(gen, new, max(1, rounds // 2), device)
        cache, full = statistics.median(times["cache"]), statistics.median(times["recompute"])
        print(
            f"generation, {new} new tokens, char_gpt model (context 256): KV cache {cache:.2f} s, "
            f"recomputing {full:.2f} s, speed-up {full / cache:.1f}x",
            flush=True,
        )
