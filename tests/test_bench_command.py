"""`python -m bprun.bench --command` runs end to end (tiny settings; not a timing test)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_command_bench_runs_bprun_and_the_plain_script_and_prints_ratios():
    proc = subprocess.run(
        [sys.executable, "-m", "bprun.bench", "--command", "--updates=5", "--rounds=1"]
        + ["--only=bprun,plain"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = [line.split() for line in proc.stdout.splitlines()]
    rows = {cells[0]: cells[1:] for cells in table if len(cells) == 4}  # command wall train out
    assert float(rows["bprun"][0]) > float(rows["bprun"][1]) > 0  # wall > training > 0
    assert float(rows["plain"][0]) > float(rows["plain"][1]) > 0
    assert "bprun / plain script, wall time:" in proc.stdout
