"""The whole command against scripts: what the user waits for, imports included.

    python -m bprun.bench --command [--rounds 3] [--updates N] [--threads 1] [--device cpu]

Runs `bprun +experiment=mnist1d_paper_cnn` (150 epochs of 40 updates), the same work as a
hand-written script (`bprun.bench.plain_cnn`) and, when `lightning` is installed, through a
Lightning Trainer over a DataLoader (`bprun.bench.lightning_cnn`), each as its own process,
rotating which goes first in each round. Reports the median wall time of each command, the
median training time (its `fit` alone, as each reports it), and the medians of the per-round
ratios. A first untimed round with a few updates fills the data cache and the OS file cache.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def bprun_executable() -> str:
    beside = Path(sys.executable).with_name("bprun")
    found = str(beside) if beside.exists() else shutil.which("bprun")
    if found is None:
        raise SystemExit("error: the `bprun` command is not installed beside this Python")
    return found


def commands(tmp: Path, data_dir: Path, device: str, threads: int, updates: int | None, r: str):
    """name -> (argv, where its training time is read)."""
    length = [] if updates is None else [f"trainer.max_updates={updates}"]
    run_dir = tmp / f"bprun-{r}"
    found = {
        "bprun": (
            [
                bprun_executable(),
                "+experiment=mnist1d_paper_cnn",
                f"trainer.threads={threads}",
                f"trainer.device={device}",
                "trainer.progress=false",
                f"paths.data_dir={data_dir}",
                f"hydra.run.dir={run_dir}",
                *length,
            ],
            run_dir / "metrics.json",
        )
    }
    script = [f"--data-dir={data_dir}", f"--threads={threads}", f"--device={device}"]
    script += [] if updates is None else [f"--updates={updates}"]
    found["plain"] = ([sys.executable, "-m", "bprun.bench.plain_cnn", *script], None)
    if importlib.util.find_spec("lightning") is not None:
        out = f"--out={tmp / f'lightning-{r}'}"
        found["lightning"] = (
            [sys.executable, "-m", "bprun.bench.lightning_cnn", *script, out],
            None,
        )
    return found


REHEARSALS: list[float] = []  # bprun's dry run of one update before training, per command


def run_one(argv: list[str], metrics: Path | None, threads: int) -> tuple[float, float]:
    """(wall seconds of the process, seconds its training took)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise SystemExit(f"error: {' '.join(argv[:3])} ... failed:\n" + "\n".join(tail))
    if metrics is not None:
        summary = json.loads(metrics.read_text())
        fit = summary["fit_time_s"]
        REHEARSALS.append(summary.get("rehearsal_s") or 0.0)
    else:
        line = [x for x in proc.stdout.splitlines() if x.startswith("BENCH ")][-1]
        fit = json.loads(line[len("BENCH ") :])["fit_s"]
    return wall, fit


def main(argv=None, device: str = "cpu", threads: int = 1, rounds: int | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bprun.bench --command")
    parser.add_argument("--updates", type=int, default=None, help="default: the run's 6000")
    parser.add_argument("--only", default=None, help="comma-separated: bprun,plain,lightning")
    args = parser.parse_args(argv)
    rounds = rounds or 3
    print(
        f"whole command, MNIST-1D paper CNN ({args.updates or 6000} updates), {threads} "
        f"thread(s), {device}, {rounds} rounds, separate processes, order rotated per round"
    )
    walls: dict[str, list[float]] = {}
    fits: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bprun-bench-") as tmp:
        tmp, data_dir = Path(tmp), Path(tmp) / "data"
        for r in range(rounds + 1):  # round 0: a few updates each, untimed
            found = commands(tmp, data_dir, device, threads, 40 if r == 0 else args.updates, str(r))
            if args.only:
                found = {k: v for k, v in found.items() if k in args.only.split(",")}
            names = list(found)
            for name in names[r % len(names) :] + names[: r % len(names)]:
                wall, fit = run_one(*found[name], threads)
                if r > 0:
                    walls.setdefault(name, []).append(wall)
                    fits.setdefault(name, []).append(fit)
    print(f"{'command':<10} {'wall s':>8} {'train s':>8} {'outside training s':>19}")
    for name in walls:
        wall, fit = statistics.median(walls[name]), statistics.median(fits[name])
        print(f"{name:<10} {wall:>8.2f} {fit:>8.2f} {wall - fit:>19.2f}")

    def ratio(values: dict, a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(values[a], values[b], strict=True))

    if REHEARSALS:  # part of bprun's start-up (outside training)
        rehearsal = statistics.median(REHEARSALS[1:] or REHEARSALS)
        print(f"of bprun's start-up, the rehearsed update:  {rehearsal:.3f} s")
    print(f"bprun / plain script, wall time:          {ratio(walls, 'bprun', 'plain'):.3f}")
    print(f"bprun / plain script, training time:      {ratio(fits, 'bprun', 'plain'):.3f}")
    if "lightning" in walls:
        print(f"Lightning / bprun, training time:         {ratio(fits, 'lightning', 'bprun'):.3f}")
        print(f"Lightning / bprun, wall time:             {ratio(walls, 'lightning', 'bprun'):.3f}")
    elif importlib.util.find_spec("lightning") is None:
        print("Lightning: not installed (pip install 'bprun[bench]' to compare)")
