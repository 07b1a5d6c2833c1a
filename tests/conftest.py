"""Shared fixtures: a `bprun` runner for end-to-end tests, one thread per process."""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# The console script beside this interpreter; `python -m bprun` where there is none
# (an install with --target, as on machines without the project's venv).
_script = Path(sys.executable).with_name("bprun")
BPRUN = str(_script) if _script.exists() else "bprun"

# Two cores are shared by pytest and the bprun processes it starts.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


# The `bprun` fixture's commands run in processes forked from a server that imported bprun
# once (tests/forkserver.py); BPRUN_TEST_FORK=0 starts each as its own process instead.
FORK = os.environ.get("BPRUN_TEST_FORK", "1") != "0" and hasattr(os, "fork")
_SERVERS: list = []


def _server():
    if not _SERVERS:
        from forkserver import ForkServer

        _SERVERS.append(ForkServer(BPRUN))
        atexit.register(_SERVERS[0].close)
    return _SERVERS[0]


def job_dir(sweep: Path, n) -> Path:
    """Job n's folder in a sweep: `<n>_<its overrides>` (a path that does not exist when the
    job has none)."""
    found = sorted(Path(sweep).glob(f"{n}_*")) if Path(sweep).is_dir() else []
    return found[0] if found else Path(sweep) / f"{n}_missing"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One dataset cache for the whole session (MNIST-1D is generated once)."""
    return tmp_path_factory.mktemp("data")


class Result:
    def __init__(self, proc: subprocess.CompletedProcess, run_dir: Path):
        self.returncode, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr
        self.run_dir = run_dir

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def metrics(self) -> dict:
        return json.loads((self.run_dir / "metrics.json").read_text())


@pytest.fixture
def bprun(tmp_path, data_dir):
    """Run the real `bprun` command; returns a Result. The run folder is tmp_path/run
    unless the arguments name hydra.run.dir themselves."""

    def run(
        *args: str, check: bool = True, timeout: float = 300, cwd: Path | None = None
    ) -> Result:
        args = list(args)
        run_dir = tmp_path / "run"
        extra = [f"paths.data_dir={data_dir}", "trainer.threads=1", "trainer.progress=false"]
        if (
            not any(a.startswith(("hydra.run.dir=", "trainer.resume=")) for a in args)
            and "-m" not in args
        ):
            extra.append(f"hydra.run.dir={run_dir}")
        for a in args:
            if a.startswith("hydra.run.dir="):
                run_dir = Path(a.split("=", 1)[1])
            if a.startswith("trainer.resume="):
                run_dir = Path(a.split("=", 1)[1])
                if run_dir.suffix == ".pt":
                    run_dir = run_dir.parent.parent
        if "-m" in args:
            extra.append(f"hydra.sweep.dir={tmp_path / 'sweep'}")
        argv = [*(["-m"] if "-m" in args else []), *extra, *[a for a in args if a != "-m"]]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if FORK:  # forked from a process that imported bprun once: the command less its imports
            code, out, err = _server().run(argv, cwd or tmp_path, env, timeout)
            proc = subprocess.CompletedProcess([BPRUN, *argv], code, out, err)
        else:
            proc = subprocess.run(
                [BPRUN, *argv],
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=cwd or tmp_path,
                env=env,
            )
        result = Result(proc, run_dir)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"bprun {' '.join(args)} exited {proc.returncode}:\n{result.output[-3000:]}"
            )
        return result

    return run
