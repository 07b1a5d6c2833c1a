"""The command line under generated mistakes: one `error:` line or a complete run, never a
traceback or a folder left behind (tests/fuzz.py draws the cases; `make fuzz` runs more)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SEED = 20261204  # the slice `make test` runs; `make fuzz SEED=...` draws others
SLICE, PARTS = 150, 3


def fuzz(*args: str, data_dir: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(HERE / "fuzz.py"), "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.slow
@pytest.mark.parametrize("part", range(1, PARTS + 1))
def test_fuzz_slice_ends_in_an_error_line_or_a_run(part, data_dir):
    proc = fuzz(
        "--n", str(SLICE), "--seed", str(SEED), "--part", f"{part}/{PARTS}", data_dir=data_dir
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert f"{SLICE // PARTS} cases, 0 failing" in proc.stdout


@pytest.mark.slow
def test_corpus_of_once_failing_command_lines_passes(data_dir):
    proc = fuzz("--corpus", data_dir=data_dir)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert ", 0 failing" in proc.stdout


def test_fuzzer_sees_an_exception_the_guard_lets_through(tmp_path, data_dir, monkeypatch):
    """With BPRUN_DEBUG=1 the guard lets the scheduler's ZeroDivisionError through: the fuzzer
    must call that case a failure (a traceback), and pass it with the guard in place."""
    sys.path.insert(0, str(HERE))
    import fuzz as fuzzer

    fuzzer.prepare()
    case = fuzzer.Case(["sched=onecycle", "sched.div_factor=0"])
    guarded = fuzzer.run_case(case, tmp_path / "guarded", data_dir)
    assert guarded.ok, guarded.problems
    assert guarded.code == 1 and not guarded.folder_left
    assert "error: sched=onecycle could not be built with sched.div_factor=0" in guarded.output
    assert "(check sched.div_factor)" in guarded.output
    monkeypatch.setenv("BPRUN_DEBUG", "1")
    broken = fuzzer.run_case(case, tmp_path / "broken", data_dir)
    assert broken.kind == "traceback", broken.problems
    assert "ZeroDivisionError" in broken.output
