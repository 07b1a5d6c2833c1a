"""Sweeps you can trust: every job runs, each is recorded, and the sweep is summarised.

`SweepCallback` is registered under `hydra.callbacks` in conf/config.yaml:

- on_multirun_start checks the `sweep` node. The jobs themselves come from
  bprun's grid sweeper (hydra_plugins/bprun_sweeper), which runs every job
  even when some fail and skips finished ones with `sweep.skip_done=true`.
- on_job_start, inside the job's process, gives each of n parallel jobs its
  share of the cores as torch threads (unless trainer.threads is set), a
  GPU of its own when there are GPUs (bprun/sweep/gpus.py), and keeps the console for warnings, errors and one line per job.
- on_job_end writes job.json (status and error) into the job folder and
  prints the job's line. A job stopped by a signal stops a sequential sweep.
- on_multirun_end writes summary.csv / summary.md, prints the best job as a
  command, and exits 1 when any job did not finish.

Exit status of `bprun -m`: 0 when every job completed (skipped ones count as
completed); 1 after all jobs ran when any failed; 128 + signal when a signal
stopped the sweep. A config that does not compose (unknown key, wrong type)
fails the whole sweep up front, before any job runs, with Hydra's message.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from bprun.errors import BprunError, Interrupted
from bprun.io import read_json
from bprun.sweep import summary
from bprun.tracking.trackers import close_sweep, open_sweep

log = logging.getLogger("bprun")

SWEEPER = "hydra_plugins.bprun_sweeper.sweeper.BprunSweeper"
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def cores() -> int:
    """CPU cores this process may use (affinity and container quotas included)."""
    try:
        from joblib import cpu_count

        return max(1, cpu_count())
    except ImportError:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def parallel_jobs(n_jobs: int | None, n_cores: int) -> int:
    """How many jobs run side by side for joblib's `n_jobs` (-1: one per core)."""
    if n_jobs is None or n_jobs == 0:
        return 1
    return n_jobs if n_jobs > 0 else max(1, n_cores + 1 + n_jobs)


def threads_per_job(n_cores: int, n_parallel: int) -> int:
    return max(1, n_cores // max(1, n_parallel))


def _error_text(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, Interrupted):  # a sweep is continued with skip_done, not trainer.resume
        text = text.split(" Resume with:")[0]
    if isinstance(exc, BprunError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _fail(message: str) -> None:
    """A user error in the sweep setup: one line, exit 1 (Hydra would only warn)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def _not_the_job_error(record: logging.LogRecord) -> bool:
    return not (record.name == "bprun" and str(record.msg).startswith("error: "))


class SweepCallback(Callback):
    def __init__(self) -> None:
        self.swept: list[str] = []
        self._started = 0.0
        self._gpu = None  # the GPU claim of the job running in this process

    # ------------------------------------------------------------ the sweep
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if OmegaConf.select(config, "sweep.skip_done") is True:
            log.warning("sweep.skip_done applies to sweeps (bprun -m ...); ignored here")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        skip = OmegaConf.select(config, "sweep.skip_done", default=False)
        if not isinstance(skip, bool):
            _fail(f"sweep.skip_done must be true or false, got '{skip}'")
        target = OmegaConf.select(config, "hydra.sweeper._target_")
        if skip and target != SWEEPER:
            _fail(
                f"sweep.skip_done works with bprun's grid sweeper, not {target}: "
                "drop the hydra/sweeper override or sweep.skip_done=true"
            )
        self.swept = summary.swept_keys(config)
        sweep_dir = Path(config.hydra.sweep.dir)
        open_sweep(config, sweep_dir.absolute())  # MLflow's parent run, when tracker has mlflow
        if skip and not summary.job_folders(sweep_dir):
            print(
                f"sweep.skip_done: {sweep_dir} holds no earlier jobs, so every job runs; to "
                "continue an earlier sweep, pass its folder as hydra.sweep.dir=...",
                flush=True,
            )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).absolute()
        result = self.write_summary(sweep_dir)
        files = [sweep_dir / "summary.md", sweep_dir / "summary.csv"]
        close_sweep(config, sweep_dir, bool(result.failed), files)
        if result.failed:
            raise SystemExit(1)

    def write_summary(self, sweep_dir: Path) -> summary.Summary:
        result = summary.summarize(sweep_dir, self.swept)
        ok = len(result.jobs) - len(result.failed)
        print(f"\n{result.markdown}\n", flush=True)
        print(
            f"{ok} ok, {len(result.failed)} not ok; "
            f"summary in {sweep_dir / 'summary.md'} and summary.csv",
            flush=True,
        )
        return result

    # ------------------------------------------------------------ each job
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        self._started = time.time()
        for handler in logging.getLogger().handlers:  # full log stays in the job's bprun.log
            if not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.WARNING)
                handler.addFilter(_not_the_job_error)  # the job's line below carries it
        n_jobs = OmegaConf.select(config, "hydra.launcher.n_jobs", default=None)
        self._gpu = None
        if n_jobs is not None and parallel_jobs(n_jobs, cores()) > 1:
            from bprun.sweep import gpus

            visible = gpus.visible_gpus()
            if visible:  # one GPU per job: jobs side by side never share one
                self._gpu = gpus.claim(Path(config.hydra.sweep.dir).absolute(), visible)
                log.info(f"GPU {self._gpu.gpu} (CUDA_VISIBLE_DEVICES={self._gpu.gpu})")
        if n_jobs is not None and OmegaConf.select(config, "trainer.threads") is None:
            import torch

            n_cores = cores()
            n = parallel_jobs(n_jobs, n_cores)
            torch.set_num_threads(threads_per_job(n_cores, n))
            log.info(
                f"torch threads: {torch.get_num_threads()} "
                f"({n_cores} cores shared by {n} parallel jobs)"
            )

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        folder = Path(config.hydra.runtime.output_dir)
        sweep_dir = Path(config.hydra.sweep.dir).absolute()
        name = folder.relative_to(sweep_dir).as_posix() if folder.is_relative_to(sweep_dir) else ""
        status, error, exc = "ok", "", None
        if job_return.status == JobStatus.FAILED:
            exc = job_return._return_value
            status = "interrupted" if isinstance(exc, Interrupted) else "failed"
            error = _error_text(exc)
            job_return.return_value = _picklable(exc, error)
        elif (read_json(folder / "metrics.json") or {}).get("status") == "pruned":
            status = "pruned"  # stopped by a search's pruner: not a failure
        record = {
            "status": status,
            "error": error,
            "overrides": list(job_return.overrides or []),
            "wall_time_s": time.time() - self._started if self._started else None,
        }
        if self._gpu is not None:
            record.update(gpu=self._gpu.gpu, started=self._started, ended=time.time())
            self._gpu.release()
            self._gpu = None
        (folder / summary.JOB_FILE).write_text(json.dumps(record, indent=2) + "\n")
        overrides = summary.describe(list(job_return.overrides or []), self.swept)
        print(summary.job_line(name or folder.name, status, overrides, folder, error), flush=True)
        launcher = OmegaConf.select(config, "hydra.launcher._target_")
        if status == "interrupted" and launcher == BASIC_LAUNCHER:
            self.write_summary(sweep_dir)
            print(
                f"sweep stopped: {error}\nContinue it with the same command plus "
                f"sweep.skip_done=true hydra.sweep.dir={sweep_dir}",
                flush=True,
            )
            raise SystemExit(exc.exit_code)


def _picklable(exc: BaseException, error: str) -> BaseException:
    """Parallel launchers send the job's exception back to the sweep process; one whose
    constructor takes extra arguments cannot be unpickled, so send its text instead."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(error)
