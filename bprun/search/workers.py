"""Long-lived worker processes that run a search's trials one after another.

`search.workers=N` gives each of the search's N slots one worker: a process
started once (spawn, so it shares no threads or locks with the sweeper) that
imports bprun and torch once and then runs trial after trial in-process, the
way Hydra's joblib launcher runs a job: compose the trial's config, run the job
in its own folder, send the JobReturn back. A trial keeps what a process of its
own gives it: its folder, log file and config are Hydra's per-job ones, and the
run seeds Python, NumPy and torch from its config before it builds anything.
What the worker keeps between trials is what costs time and holds no trial's
state: imported modules, and the datasets it built (keyed by their config, see
bprun.data.memo).

A worker is replaced by a fresh one
- after a trial that failed (it raised: whatever it left behind goes with it),
- when a trial runs past `search.trial_timeout` seconds (the worker is killed;
  the trial is recorded as failed),
- when its resident memory passed `search.worker_memory_mb` after a trial,
- when it died (killed, out of memory): the trial is recorded as failed.
Workers die with the sweeper (PR_SET_PDEATHSIG), so a search killed with
SIGKILL leaves no trial training on; the next run of the command resumes it.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import time

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus

log = logging.getLogger("bprun")


class WorkerError(RuntimeError):
    """A trial that did not come back from its worker (timeout, death)."""


class Worker:
    """One worker process and the pipe the sweeper talks to it through."""

    def __init__(self, launcher, name: str):
        import cloudpickle

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, os.getpid()), name=name, daemon=True)
        self.process.start()
        child.close()
        # The task function is the undecorated `bprun.cli.hydra_main`, which plain pickle
        # cannot name: cloudpickle (as joblib's workers get it).
        self.conn.send_bytes(
            cloudpickle.dumps(
                (
                    launcher.hydra_context,
                    launcher.config,
                    launcher.task_function,
                    Singleton.get_state(),
                )
            )
        )

    def run(self, idx: int, overrides: list[str], timeout: float | None) -> tuple:
        """The trial's JobReturn, the worker's resident memory after it (bytes), and how long
        it took to compose the trial's config and to run its job (seconds). The timeout
        counts from when the worker took the trial, not from when it started up."""
        self.conn.send((idx, list(overrides)))
        self._receive(None, timeout)  # the worker says it took the trial
        return pickle.loads(self._receive(timeout, timeout))

    def _receive(self, limit: float | None, timeout: float | None) -> bytes:
        deadline = None if limit is None else time.monotonic() + limit
        while True:  # poll in steps, so a worker that died is seen at once
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                self.kill()
                raise WorkerError(
                    f"the trial ran past search.trial_timeout={timeout:g} s: its worker was "
                    "killed and replaced"
                )
            try:
                if self.conn.poll(0.5 if left is None else min(0.5, left)):
                    return self.conn.recv_bytes()
            except (EOFError, OSError):
                pass
            if not self.process.is_alive():
                self.process.join()
                raise WorkerError(
                    f"its worker process died (exit code {self.process.exitcode}); the next trial "
                    "runs on a fresh one"
                )

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()

    def close(self) -> None:
        """Ask the worker to leave; kill it if it does not within a few seconds."""
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(None)
        self.process.join(5)
        self.kill()


class WorkerSlot:
    """What a slot of the sweeper calls instead of `launcher.launch`: runs one trial on its
    worker, starting or replacing the worker as needed."""

    def __init__(self, launcher, name: str, timeout: float | None, memory_mb: float):
        self.launcher, self.name = launcher, name
        self.timeout, self.memory_mb = timeout, memory_mb
        self.worker: Worker | None = Worker(launcher, name)  # started now: imports overlap
        self.timing: dict = {}  # of the last trial: compose_s, job_s

    def launch(self, overrides: list[str], idx: int) -> JobReturn:
        self.timing = {}
        if self.worker is None:
            self.worker = Worker(self.launcher, self.name)
        try:
            ret, rss, self.timing = self.worker.run(idx, overrides, self.timeout)
        except WorkerError:
            self.worker.kill()
            self.worker = None
            raise
        if ret.status == JobStatus.FAILED or rss > self.memory_mb * 2**20:
            if ret.status != JobStatus.FAILED:
                log.info(
                    f"{self.name}: {rss / 2**20:.0f} MiB resident after trial {idx}, past "
                    f"search.worker_memory_mb={self.memory_mb:g}: replacing it"
                )
            self.worker.close()
            self.worker = None
        return ret

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None


# ------------------------------------------------------------------ the worker side
def _serve(conn, parent: int) -> None:
    _die_with(parent)
    from bprun.data.memo import ENV as KEEP_DATASETS  # (imports torch: the worker's side only)

    os.environ[KEEP_DATASETS] = "1"  # a worker keeps the datasets it built
    # The sweeper's SIGINT reaches the worker too (one process group): the trial's training
    # loop saves and stops on it; between trials the worker just waits for its next message.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import optuna  # noqa: F401  the trial's pruning callback reports through it

    import bprun.cli  # noqa: F401  the task's module: its configs and signal handling
    import bprun.tasks.train  # noqa: F401  torch and the engine, once, before the first trial
    import bprun.tracking  # noqa: F401

    signal.signal(signal.SIGINT, signal.default_int_handler)
    hydra_context, config, task_function, singleton = pickle.loads(conn.recv_bytes())
    from bprun.search.compose import TrialComposer

    composer = TrialComposer(hydra_context.config_loader, config)
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        idx, overrides = message
        conn.send_bytes(b"")  # taken: the trial's timeout starts now
        ret, timing = _execute(idx, overrides, hydra_context, composer, task_function, singleton)
        conn.send_bytes(_dumps(ret, timing))
        _flush()


def _execute(idx, overrides, hydra_context, composer, task_function, singleton):
    """Hydra's joblib launcher's execute_job, timed: compose the trial's config (from the
    worker's composed configs, see bprun.search.compose), run the job (run_job sets the
    HydraConfig itself, twice: a third time here only copied the config once more)."""
    from hydra.core.utils import run_job, setup_globals
    from omegaconf import open_dict

    start, cpu_start = time.perf_counter(), time.process_time()
    setup_globals()
    Singleton.set_state(singleton)
    sweep_config = composer.compose(list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
        sweep_config.hydra.job.num = idx
    composed = time.perf_counter()
    ret = run_job(
        hydra_context=hydra_context,
        config=sweep_config,
        task_function=task_function,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )
    timing = {
        "compose_s": composed - start,
        "job_s": time.perf_counter() - composed,
        "cpu_s": time.process_time() - cpu_start,  # the worker's CPU seconds on the trial
    }
    return ret, timing


def _dumps(ret: JobReturn, timing: dict) -> bytes:
    """What the sweeper reads of a JobReturn (status, value or exception, the job's folder)
    and this process's resident memory; an exception that does not pickle goes as its text."""
    from omegaconf import OmegaConf

    folder = None if ret.hydra_cfg is None else str(ret.hydra_cfg.hydra.runtime.output_dir)
    slim = JobReturn(
        overrides=ret.overrides,
        hydra_cfg=OmegaConf.create({"hydra": {"runtime": {"output_dir": folder}}}),
        working_dir=ret.working_dir,
        task_name=ret.task_name,
        status=ret.status,
        _return_value=ret._return_value,
    )
    try:
        return pickle.dumps((slim, _rss(), timing))
    except Exception:
        exc = ret._return_value
        slim._return_value = RuntimeError(f"{type(exc).__name__}: {exc}")
        return pickle.dumps((slim, _rss(), timing))


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _die_with(parent: int) -> None:
    """Linux: the kernel sends SIGKILL to this worker when the sweeper dies."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the sweeper died before the line above ran
        os._exit(1)


def pool_size(settings, launcher_target: str | None) -> int:
    """Worker processes the search runs: search.workers when set, else n_jobs when it is
    more than one and the launcher runs jobs on this machine."""
    if settings.workers is not None:
        return settings.workers
    return settings.n_jobs if settings.n_jobs > 1 and _local(launcher_target) else 0


def _local(target: str | None) -> bool:
    return target is None or target.startswith(
        ("hydra._internal.core_plugins.basic_launcher", "hydra_plugins.hydra_joblib_launcher")
    )


def check_launcher(settings, launcher_target: str | None) -> None:
    from bprun.errors import BprunError

    if settings.workers and not _local(launcher_target):
        raise BprunError(
            f"search.workers={settings.workers} runs trials in worker processes on this "
            f"machine, but hydra.launcher is {launcher_target}, which runs each job on its own "
            "(a cluster's): drop search.workers, or set it to 0"
        )


def describe(n: int) -> str:
    return f"{n} worker process{'es' if n != 1 else ''}" if n else "a process per trial"
