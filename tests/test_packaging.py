"""A non-editable install (a built wheel) carries conf/ and runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_wheel_install_runs(tmp_path, data_dir):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, ROOT],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(wheels.glob("bprun-*.whl"))
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", target, wheel],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert (target / "bprun" / "conf" / "config.yaml").is_file()
    assert (target / "bprun" / "conf" / "model" / "mlp.yaml").is_file()
    assert (target / "hydra_plugins" / "bprun_sweeper" / "sweeper.py").is_file()
    assert (target / "hydra_plugins" / "bprun_optuna_sweeper" / "optuna_sweeper.py").is_file()
    assert (target / "bprun" / "conf" / "search" / "mlp_lr.yaml").is_file()
    assert (target / "bprun" / "conf" / "hydra" / "sweeper" / "optuna.yaml").is_file()
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bprun",
            f"hydra.run.dir={tmp_path}/run",
            f"paths.data_dir={data_dir}",
            "trainer.fast_dev_run=true",
            "model=cnn",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "run" / "metrics.json").is_file()
    probe = subprocess.run(
        [sys.executable, "-c", "import bprun; print(bprun.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert probe.stdout.startswith(str(target))
    # Hydra's own discovery finds the grid sweeper in the installed hydra_plugins namespace.
    discover = (
        "from hydra.core.plugins import Plugins; from hydra.plugins.sweeper import Sweeper; "
        "print([c.__module__ for c in Plugins.instance().discover(Sweeper)])"
    )
    found = subprocess.run(
        [sys.executable, "-c", discover], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert "hydra_plugins.bprun_sweeper.sweeper" in found.stdout, found.stderr
    assert "hydra_plugins.bprun_optuna_sweeper.optuna_sweeper" in found.stdout, found.stderr
