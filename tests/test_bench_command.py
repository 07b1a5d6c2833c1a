"""`python -m bprun.bench --command` runs end to end (tiny settings; not a timing test)."""

from __future__ import annotations

import os
import re
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


def test_loop_bench_prints_each_ratio_with_its_quartiles():
    """`python -m bprun.bench` (tiny settings): one row per model and variant, each ratio the
    median of the ratios of chunks of interleaved updates, with the quartiles around it."""
    proc = subprocess.run(
        [sys.executable, "-m", "bprun.bench", "--models=mlp,paper_cnn", "--updates=51"]
        + ["--rounds=2", "--variants=features off,grad clip"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = re.findall(
        r"^(\w+) +(features off|grad clip) +([\d.]+) +([\d.]+) +([\d.]+) \[([\d.]+)-([\d.]+)\] "
        r"+([\d.]+) +([\d.]+) \[([\d.]+)-([\d.]+)\]$",
        proc.stdout,
        re.M,
    )
    assert [(r[0], r[1]) for r in rows] == [
        ("mlp", "features off"),
        ("mlp", "grad clip"),
        ("paper_cnn", "features off"),
        ("paper_cnn", "grad clip"),
    ], proc.stdout
    for row in rows:
        _, _, engine, plain, ratio, q1, q3, impl, ratio_impl, q1i, q3i = row
        # the median has three decimals, the quartiles two
        assert float(q1) - 0.005 <= float(ratio) <= float(q3) + 0.005
        assert float(q1i) - 0.005 <= float(ratio_impl) <= float(q3i) + 0.005
        assert float(engine) > 0 and float(plain) > 0 and float(impl) > 0
