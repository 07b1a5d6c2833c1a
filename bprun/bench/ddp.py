"""Benchmark: one training job over N ranks (`trainer.devices=N`) against one process
doing the same work.

    python -m bprun.bench --ddp [--devices 2] [--device cpu] [--epochs 4] [--batch 64]

Both runs are the real `bprun` command on MNIST-1D with the same global batch
(one process: batch x N; each rank: batch) and the same number of updates.
Throughput is the samples per second of the training epochs after the first
(start-up and the first epoch's warm-up left out), as each run reports it in
metrics.json; the ratio is N ranks over one process. On the CPU the ranks share
the cores (one thread each), so the ratio says what the gloo all-reduce costs
more than what N machines would gain.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def measure(devices: int, batch: int, args, folder: Path) -> float:
    run = folder / f"devices{devices}"
    cmd = [
        sys.executable,
        "-m",
        "bprun",
        "dataset=mnist1d",
        f"dataset.batch_size={batch}",
        f"trainer.devices={devices}",
        f"trainer.device={args.device}",
        f"trainer.max_epochs={args.epochs}",
        "trainer.threads=1",
        "trainer.progress=false",
        "trainer.checkpoint.enabled=false",
        f"paths.data_dir={args.data_dir}",
        f"hydra.run.dir={run}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-2000:]}")
    history = json.loads((run / "metrics.json").read_text())["history"]
    rates = [h["throughput/samples_per_s"] for h in history[1:]] or [
        history[0]["throughput/samples_per_s"]
    ]
    return statistics.median(rates)


def main(args) -> None:
    n = args.devices
    print(
        f"MNIST-1D MLP, {args.epochs} epochs, global batch {args.batch * n}, {args.device}, "
        "1 thread per process"
    )
    with tempfile.TemporaryDirectory() as tmp:
        one = measure(1, args.batch * n, args, Path(tmp))
        many = measure(n, args.batch, args, Path(tmp))
    print(f"{'run':<14} {'samples/s':>10}")
    print(f"{'1 process':<14} {one:>10.0f}")
    print(f"{f'{n} ranks (DDP)':<14} {many:>10.0f}")
    print(f"ratio {many / one:.3f}")
