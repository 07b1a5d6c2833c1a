"""What pruning buys a search: `python -m bprun.bench.search`.

Runs the same search twice, end to end as a user runs it (`bprun -m
search=mlp_lr`, TPE with one seed, `--trials` trials, `--n-jobs` at a time,
the study maximising val/acc), once with the median pruner and once with
`search.pruner=none`, and reports for each the wall time until a finished
trial first reached `--target` validation accuracy, the whole search's wall
time, and how many trials were pruned. A benchmark, not a test: run it on a
quiet machine.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bprun.sweep.callback import cores


def search(out: Path, pruner: str, a) -> dict:
    import optuna
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    exe = Path(sys.executable).with_name("bprun")
    args = [
        str(exe), "-m", "search=mlp_lr", f"hydra.sweep.dir={out}", f"paths.data_dir={a.data_dir}",
        f"search.pruner={pruner}", f"search.n_trials={a.trials}", f"search.n_jobs={a.n_jobs}",
        f"search.study_name=bench_{pruner}", "search.seed=0", "search.n_warmup_steps=3",
        "trainer.monitor=val/acc", "trainer.mode=max", f"trainer.max_epochs={a.epochs}",
        "trainer.checkpoint.enabled=false", "optim=adam",
        "optim.lr=tag(log,interval(1e-5,1e-1))", *a.overrides,
    ]  # fmt: skip
    start = time.time()
    proc = subprocess.run(args, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(out / "optuna.journal")))
    study = optuna.load_study(study_name=f"bench_{pruner}", storage=storage)
    reached = [
        t.datetime_complete.timestamp() - start
        for t in study.trials
        if t.state == TrialState.COMPLETE and t.value >= a.target
    ]
    return {
        "wall": wall,
        "to_target": min(reached) if reached else None,
        "pruned": sum(t.state == TrialState.PRUNED for t in study.trials),
        "best": study.best_value,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="extra overrides for every trial")
    p.add_argument("--trials", type=int, default=16, help="trials per search (default 16)")
    p.add_argument("--epochs", type=int, default=30, help="epochs per trial (default 30)")
    p.add_argument("--target", type=float, default=0.6, help="validation accuracy to reach")
    p.add_argument("--n-jobs", type=int, default=cores(), help="trials at a time (default: cores)")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--out", default="outputs/bench_search", help="scratch folder, replaced")
    a = p.parse_args(argv)

    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    print(
        f"{a.trials}-trial searches, {a.epochs} epochs a trial, {a.n_jobs} at a time on "
        f"{cores()} cores; target val/acc {a.target}",
        flush=True,
    )
    results = {}
    for pruner in ("median", "none"):
        r = results[pruner] = search(out / pruner, pruner, a)
        reach = "not reached" if r["to_target"] is None else f"{r['to_target']:6.1f} s"
        print(
            f"pruner={pruner:<7} target after {reach}, search {r['wall']:6.1f} s, "
            f"{r['pruned']:2d} pruned, best val/acc {r['best']:.4f}",
            flush=True,
        )
    on, off = results["median"], results["none"]
    print(f"whole search: pruning {off['wall'] / on['wall']:.2f}x faster")
    if on["to_target"] and off["to_target"]:
        print(f"to the target: pruning {off['to_target'] / on['to_target']:.2f}x faster")
    return results


if __name__ == "__main__":
    main()
