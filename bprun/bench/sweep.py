"""How much faster a sweep runs with parallel jobs: `python -m bprun.bench.sweep`.

Times the same sweep (`--jobs` learning rates of the default MLP on MNIST-1D)
end to end as a user runs it: with Hydra's basic launcher (one job after
another, torch using every core), the same with one thread a job, and with
`hydra/launcher=joblib` (one job per core, each limited to its share of
threads by bprun's sweep callback). Prints the wall times and the speed-ups.
A benchmark, not a test: run it on a quiet machine. Jobs must be long enough
(the default: about 15 s each on one core) for parallelism to outweigh the
start-up of joblib's worker processes, which import torch afresh.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bprun.sweep.callback import cores


def bprun(*args: str) -> float:
    """Run the `bprun` command; seconds of wall time."""
    exe = Path(sys.executable).with_name("bprun")
    start = time.perf_counter()
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"bprun {' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return seconds


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "overrides", nargs="*", help="extra overrides for every job, e.g. trainer.device=cpu"
    )
    p.add_argument("--jobs", type=int, default=4, help="jobs in the sweep (default 4)")
    p.add_argument("--epochs", type=int, default=300, help="epochs per job (default 300)")
    p.add_argument("--n-jobs", type=int, default=cores(), help="parallel jobs (default: cores)")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--out", default="outputs/sweep_bench", help="scratch folder, replaced")
    a = p.parse_args(argv)

    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    lrs = ",".join(f"{0.001 * (i + 1):g}" for i in range(a.jobs))
    common = [
        f"paths.data_dir={a.data_dir}",
        f"optim.lr={lrs}",
        f"trainer.max_epochs={a.epochs}",
        "trainer.checkpoint.enabled=false",
        *a.overrides,
    ]
    bprun(f"paths.data_dir={a.data_dir}", "trainer.fast_dev_run=true", f"hydra.run.dir={out}/warm")
    print(f"{a.jobs} jobs of {a.epochs} epochs on {cores()} cores", flush=True)
    basic = bprun("-m", *common, f"hydra.sweep.dir={out}/basic")
    print(f"basic launcher                      {basic:7.1f} s", flush=True)
    one = bprun("-m", *common, "trainer.threads=1", f"hydra.sweep.dir={out}/basic1")
    print(f"basic launcher, trainer.threads=1   {one:7.1f} s", flush=True)
    parallel = bprun(
        "-m",
        *common,
        "hydra/launcher=joblib",
        f"hydra.launcher.n_jobs={a.n_jobs}",
        f"hydra.sweep.dir={out}/joblib",
    )
    print(f"joblib launcher, n_jobs={a.n_jobs:<2}          {parallel:7.1f} s", flush=True)
    print(f"speed-up over the basic launcher    {basic / parallel:7.2f}x")
    print(f"  over basic with one thread a job  {one / parallel:7.2f}x")
    return basic / parallel


if __name__ == "__main__":
    main()
