"""Optimizers side by side, AlgoPerf-style: updates and training time to a target validation
loss, and the final validation loss, over several seeds.

    python -m bprun.bench.optimizers                      # the default: ~15 minutes on 2 cores
    python -m bprun.bench.optimizers --models gpt --optims adamw,muon
    python -m bprun.bench.optimizers --models cnn --updates 360 --seeds 5 --optims adam,kfac

Each run is the `bprun` run of `model=<model> optim=<optim> seed=<seed>` (the optimizer's
shipped defaults, sched=none, no early stopping), built by the same code as the command and
trained in this process: the CNN and the transformer on MNIST-1D, the character-level GPT
(narrowed) on the embedded corpus. Validation runs every `--val-every` updates (on MNIST-1D
an "epoch" of that many batches); time counts training only. An optimizer that misses the target in a run is
reported with how many of its seeds reached it; means are over the seeds that did.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile

import torch
from hydra import compose, initialize_config_module

from bprun.config import register_configs
from bprun.errors import BprunError

MODELS = {
    "cnn": ["model=cnn"],
    "transformer": ["model=transformer"],
    # conf/experiment/char_gpt_cpu.yaml's GPT, narrowed to run in seconds: on the embedded
    # corpus (no dataset.path), character tokens, context 32, batch 12
    "gpt": [
        "dataset=text",
        "model=gpt",
        "problem=lm",
        "model.n_layer=2",
        "model.n_head=2",
        "model.n_embd=64",
        "dataset.block_size=32",
        "dataset.batch_size=12",
        "dataset.eval_batch_size=12",
        "trainer.val_batches=10",
    ],
}
DATA = {"cnn": "MNIST-1D", "transformer": "MNIST-1D", "gpt": "the embedded corpus (chars)"}
# Each model's target val/loss (one AdamW reaches late in its budget, AlgoPerf-style), and its
# budget: (updates, validate every N).
TARGETS = {"cnn": 1.0, "transformer": 1.75, "gpt": 2.2}
BUDGETS = {"cnn": (60, 6), "transformer": (60, 6), "gpt": (400, 25)}
# Text has no epochs worth the name: these models run by updates, validating every
# --val-every of them (trainer.val_every_n_updates).
BY_UPDATES = {"gpt"}
OPTIMS = ["adam", "adamw", "kfac", "muon", "adafactor", "shampoo", "soap", "adamw_schedulefree"]


def budget(model: str, args) -> tuple[int, int]:
    """(updates, validate every N) for `model`: the flags where given, else its default."""
    updates, every = BUDGETS[model]
    return args.updates or updates, args.val_every or every


def run_one(model: str, optim: str, seed: int, args, data_dir: str) -> dict:
    from bprun.tasks.setup import build_trainer, trainer_settings

    updates, every = budget(model, args)
    if model in BY_UPDATES:
        schedule = [
            "trainer.max_epochs=1000000",
            f"trainer.max_updates={updates}",
            f"trainer.val_every_n_updates={every}",
        ]
    else:
        epochs = -(-updates // every)
        schedule = [f"trainer.max_epochs={epochs}", f"trainer.limit_train_batches={every}"]
    overrides = [
        *MODELS[model],
        f"optim={optim}",
        "sched=none",
        f"seed={seed}",
        f"paths.data_dir={data_dir}",
        *schedule,
        "trainer.threads=1",
        "trainer.progress=false",
        "trainer.checkpoint.enabled=false",
        "trainer.early_stopping.patience=null",  # every run gets all its updates
    ]
    with initialize_config_module("bprun.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    s = trainer_settings(cfg)
    trainer, data = build_trainer(cfg, None, s)
    trainer.fit(data.train, data.val)
    target, seconds = TARGETS[model] if args.target is None else args.target, 0.0
    reached = None
    for m in trainer.history:
        seconds += m["time/epoch_s"] if "time/epoch_s" in m else m["time/check_s"]
        if reached is None and m["val/loss"] <= target:
            reached = (m["update"], seconds)
    return {
        "reached": reached,
        "final": trainer.history[-1]["val/loss"],
        "curve": [round(m["val/loss"], 2) for m in trainer.history],
    }


def _mean_sd(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{format(statistics.mean(values), fmt)} ± {format(sd, fmt)}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--models", default="cnn,transformer,gpt", help="comma-separated: cnn,transformer,gpt"
    )
    p.add_argument("--optims", default=",".join(OPTIMS), help="comma-separated optim= names")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--updates", type=int, default=None, help="updates per run (default per model)")
    p.add_argument("--val-every", type=int, default=None, help="validate every N updates")
    p.add_argument("--target", type=float, default=None, help="target val/loss (default per model)")
    args = p.parse_args(argv)
    logging.getLogger("bprun").setLevel(logging.WARNING)
    register_configs()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as data_dir:
        for model in args.models.split(","):
            target = TARGETS[model] if args.target is None else args.target
            print(
                f"\n{model} on {DATA[model]}: target val/loss {target}, {budget(model, args)[0]} updates, "
                f"{args.seeds} seeds (mean ± sd over the seeds that reached it)\n"
            )
            print("| optim | reached | updates to target | seconds to target | final val/loss |")
            print("|---|---|---|---|---|")
            for optim in args.optims.split(","):
                try:
                    runs = [
                        run_one(model, optim, seed, args, data_dir) for seed in range(args.seeds)
                    ]
                except BprunError as e:  # e.g. muon on a model without hidden matrices
                    print(f"| {optim} | not applicable: {e} | | | |")
                    continue
                hits = [r["reached"] for r in runs if r["reached"] is not None]
                print(
                    f"| {optim} | {len(hits)}/{len(runs)} "
                    f"| {_mean_sd([h[0] for h in hits], '.0f')} "
                    f"| {_mean_sd([h[1] for h in hits], '.2f')} "
                    f"| {_mean_sd([r['final'] for r in runs], '.3f')} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
