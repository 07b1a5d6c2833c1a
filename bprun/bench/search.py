"""What pruning and workers buy a search: `python -m bprun.bench --search`.

Runs a shipped MNIST-1D search (`bprun -m search=mlp_lr`, or `--space mlp`:
width, dropout, batch size too; TPE, the study maximising val/acc) end to end as a user runs it, `--trials` trials, `--n-jobs`
at a time, in three modes: pruning off (`search.pruner=none`, a launcher job per
trial), pruning on, and pruning on with worker processes (`search.workers`).
Each mode runs with `--seeds` sampler seeds; within a seed the modes run one
after the other, their order rotating from seed to seed, so load that comes
and goes on a shared machine falls on every mode alike.

For each run it reports the wall time until a finished trial first reached
`--target` validation accuracy (from the command's start), the best value at
the end, the trials' total time (ask to tell), and the time per trial that is
not training: a trial's ask, launch and tell, less its training loop
(metrics.json's fit_time_s), from the trial.json each trial leaves; on workers
also the CPU seconds the worker spent on the trial outside its training loop
(`cpu_s` less `fit_cpu_s`), which other processes on a shared machine do not
inflate as they inflate wall time. A benchmark, not a test: the ratios are the
figures to read.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bprun.sweep.callback import cores

MODES = {
    "off": ["search.pruner=none", "search.workers=0"],
    "on": ["search.workers=0"],
    "on+workers": [],  # search.workers=n_jobs
}


def search(out: Path, mode: str, seed: int, a) -> dict:
    import optuna
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    exe = Path(sys.executable).with_name("bprun")
    name = f"bench_{mode.replace('+', '_')}_{seed}"
    extra = MODES[mode] or [f"search.workers={a.n_jobs}"]
    args = [
        str(exe), "-m", f"search={a.space}", f"hydra.sweep.dir={out}", f"paths.data_dir={a.data_dir}",
        f"search.pruner={a.pruner}", f"search.n_trials={a.trials}", f"search.n_jobs={a.n_jobs}",
        f"search.study_name={name}", f"search.seed={seed}", "trainer.monitor=val/acc",
        "trainer.mode=max", f"trainer.max_epochs={a.epochs}", "trainer.checkpoint.enabled=false",
        "trainer.threads=1", "trainer.progress=false", *extra, *a.overrides,
    ]  # fmt: skip
    start = time.time()
    proc = subprocess.run(args, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(out / "optuna.journal")))
    trials = optuna.load_study(study_name=name, storage=storage).trials
    reached = [
        t.datetime_complete.timestamp() - start
        for t in trials
        if t.state == TrialState.COMPLETE and t.value >= a.target
    ]
    timings = []
    for t in trials:
        record = out / str(t.number) / "trial.json"
        timing = json.loads(record.read_text()).get("timing", {}) if record.is_file() else {}
        if "fit_s" in timing:
            spent = timing["ask_s"] + timing["launch_s"] + timing["tell_s"]
            cpu = timing["cpu_s"] - timing["fit_cpu_s"] if "cpu_s" in timing else None
            timings.append((t.number, spent, spent - timing["fit_s"], cpu, timing))
    done = [t for t in trials if t.datetime_complete is not None]
    later = [overhead for n, _, overhead, _, _ in timings if n >= a.n_jobs]  # slots warm
    later_cpu = [cpu for n, _, _, cpu, _ in timings if n >= a.n_jobs and cpu is not None]
    return {
        "wall": wall,
        "to_target": min(reached) if reached else None,
        "best": max((t.value for t in trials if t.state == TrialState.COMPLETE), default=None),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "trial_time": sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done),
        "overhead": statistics.median(later) if later else None,
        "overhead_cpu": statistics.median(later_cpu) if later_cpu else None,
        "overhead_first": timings[0][2] if timings else None,
        "timings": [tm for *_, tm in timings],
        "curves": [
            [t.intermediate_values[e] for e in sorted(t.intermediate_values)]
            for t in trials
            if t.intermediate_values
        ],
    }


# Pruner settings replayed on the learning curves of the searches without pruning.
REPLAYED = {
    "median, warm-up 1": ("median", 1),
    "median, warm-up 2": ("median", 2),
    "median, warm-up 4": ("median", 4),
    "percentile 25, warm-up 2": ("percentile", 2),
    "successive halving, min 1, rf 3": ("successive_halving", 1),
    "successive halving, min 2, rf 3": ("successive_halving", 2),
    "hyperband, min 1, rf 3": ("hyperband", 1),
}


def replay(curves: list[list[list[float]]], max_epochs: int) -> None:
    """Each pruner setting on the recorded curves (val/acc per epoch of every trial of each
    search without pruning, in trial order): the epochs it would have run, as a share of all,
    and how many searches keep the trial with the best final value."""
    import optuna

    from bprun.search.settings import SearchSettings
    from bprun.search.study import make_pruner

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"\npruners replayed on the {len(curves)} searches without pruning (val/acc per epoch):")
    print(f"  {'pruner':<32} {'epochs run':>10} {'best kept':>9}")
    for label, (pruner, low) in REPLAYED.items():
        settings = SearchSettings(pruner=pruner, n_warmup_steps=low, min_resource=low)
        ran = total = kept = 0
        for trials in curves:
            study = optuna.create_study(
                direction="maximize", pruner=make_pruner(settings, max_epochs)
            )
            best_final, best_kept = max(max(c) for c in trials), False
            for curve in trials:
                trial = study.ask()
                for epoch, value in enumerate(curve, start=1):
                    trial.report(value, epoch)
                    ran += 1
                    if trial.should_prune():
                        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                        break
                else:
                    study.tell(trial, max(curve))
                    best_kept |= max(curve) == best_final
                total += len(curve)
            kept += best_kept
        print(f"  {label:<32} {ran / max(total, 1):>9.0%} {kept:>6}/{len(curves)}")


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _fmt(v, spec: str = "6.1f", unit: str = " s") -> str:
    return "-" if v is None else f"{v:{spec}}{unit}"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="extra overrides for every trial")
    p.add_argument("--space", default="mlp_lr", help="the shipped search (default mlp_lr)")
    p.add_argument("--trials", type=int, default=16, help="trials per search (default 16)")
    p.add_argument("--epochs", type=int, default=20, help="epochs per trial (default 20)")
    p.add_argument("--seeds", type=int, default=3, help="sampler seeds per mode (default 3)")
    p.add_argument("--target", type=float, default=0.6, help="validation accuracy to reach")
    p.add_argument("--pruner", default="median", help="search.pruner when pruning is on")
    p.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
    p.add_argument("--n-jobs", type=int, default=cores(), help="trials at a time (default: cores)")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--out", default="outputs/bench_search", help="scratch folder, replaced")
    a = p.parse_args(argv)
    modes = a.modes.split(",")
    for mode in modes:
        if mode not in MODES:
            p.error(f"--modes: {mode} is not one of {', '.join(MODES)}")

    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    print(
        f"{a.trials}-trial searches of search={a.space}, {a.epochs} epochs a trial, {a.n_jobs} at a "
        f"time on {cores()} cores, search.pruner={a.pruner} when on; target val/acc {a.target}; "
        f"seeds 0..{a.seeds - 1}",
        flush=True,
    )
    print(
        f"{'seed':>4} {'mode':<11} {'to target':>10} {'search':>8} {'best':>7} {'pruned':>6} "
        f"{'trial time':>10} {'not training/trial':>18} {'(first)':>8} {'(CPU)':>7}",
        flush=True,
    )
    results: dict[str, list[dict]] = {m: [] for m in modes}
    for seed in range(a.seeds):
        order = modes[seed % len(modes) :] + modes[: seed % len(modes)]
        for mode in order:
            r = search(out / f"{mode}_{seed}", mode, seed, a)
            results[mode].append(r)
            print(
                f"{seed:>4} {mode:<11} {_fmt(r['to_target'], '8.1f'):>10} "
                f"{_fmt(r['wall'], '6.1f'):>8} {_fmt(r['best'], '.4f', ''):>7} {r['pruned']:>6} "
                f"{_fmt(r['trial_time'], '8.1f'):>10} {_fmt(r['overhead'], '.2f'):>18} "
                f"{_fmt(r['overhead_first'], '.1f'):>8} {_fmt(r['overhead_cpu'], '.2f'):>7}",
                flush=True,
            )
    print(f"\nmean of {a.seeds} seeds:")
    for mode in modes:
        rs = results[mode]
        print(
            f"  {mode:<11} to target {_fmt(_mean([r['to_target'] for r in rs]))}, search "
            f"{_fmt(_mean([r['wall'] for r in rs]))}, best {_fmt(_mean([r['best'] for r in rs]), '.4f', '')}, "
            f"trial time {_fmt(_mean([r['trial_time'] for r in rs]))}, not training per trial "
            f"{_fmt(_mean([r['overhead'] for r in rs]), '.2f')} (CPU "
            f"{_fmt(_mean([r['overhead_cpu'] for r in rs]), '.2f')})"
        )
    if "off" in results and len(modes) > 1:
        off = results["off"]
        for mode in modes[1:] if modes[0] == "off" else [m for m in modes if m != "off"]:
            rs = results[mode]
            ratios = [
                o["to_target"] / r["to_target"]
                for o, r in zip(off, rs, strict=True)
                if o["to_target"] and r["to_target"]
            ]
            walls = [o["wall"] / r["wall"] for o, r in zip(off, rs, strict=True)]
            shown = ", ".join(f"{x:.2f}x" for x in ratios) or "target not reached by both"
            print(
                f"pruning {mode} vs off: to the target {shown} (per seed), whole search "
                f"{statistics.fmean(walls):.2f}x (mean)"
            )
    if "off" in results:
        replay([r["curves"] for r in results["off"]], a.epochs)
    return results


if __name__ == "__main__":
    main()
