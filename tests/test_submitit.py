"""Sweeps through hydra-submitit-launcher on this machine (`hydra/launcher=submitit_local`):
jobs run in processes that submitit starts, their results come back pickled, and a job
that gets submitit's requeue signal saves last.pt, is started again and resumes from it.
The same launcher code runs SLURM jobs (tests/test_slurm.py)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import BPRUN, job_dir
from omegaconf import OmegaConf

from hydra_plugins.bprun_submitit import launcher

# Two jobs that train the same weights: the log cadence changes nothing that is learnt.
SAME_TWICE = "trainer.log_every_n_updates=10,11"
LONG = [
    "trainer.device=cpu",
    "trainer.max_epochs=60",
    "trainer.limit_train_batches=4",
    "trainer.checkpoint.last_every_n_seconds=0",  # last.pt at every epoch's end
]


def rows(sweep: Path) -> list[dict]:
    with (sweep / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def weights(folder: Path) -> dict:
    return torch.load(folder / "checkpoints" / "last.pt", weights_only=True)["model"]


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def end_session(proc: subprocess.Popen) -> None:
    """Stop the sweep and whatever jobs it left running (all in its session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def sweep_command(sweep: Path, data_dir: Path, *args: str) -> list[str]:
    return [
        BPRUN,
        "-m",
        "hydra/launcher=submitit_local",
        f"hydra.sweep.dir={sweep}",
        f"paths.data_dir={data_dir}",
        "trainer.threads=1",
        *args,
    ]


def wait_for(predicate, what: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the sweep ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.slow
def test_requeued_ddp_job_resumes_and_ends_like_an_uninterrupted_one(tmp_path, data_dir):
    """2 jobs of 2 ranks each (2 submitit tasks, gloo): job 0 gets submitit's signal
    mid-run, saves, is started again and resumes; it ends with job 1's weights."""
    sweep = tmp_path / "sweep"
    hold = tmp_path / "hold"  # job 0 waits mid-training while it exists: still running
    hold.touch()  # when the signal comes, however fast the machine
    tests = str(Path(__file__).parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": tests, "BPRUN_TEST_HOLD": str(hold)}
    held = "model._target_=held_model.HeldMLP"
    proc = subprocess.Popen(
        sweep_command(sweep, data_dir, *LONG, SAME_TWICE, "trainer.devices=2", held),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # the jobs' processes too end with the session below
    )
    try:
        job = job_dir(sweep, 0)
        marker = job / launcher.JOB_ID_FILE
        wait_for(lambda: (job_dir(sweep, 0) / "checkpoints" / "last.pt").is_file(), "last.pt", proc)
        job = job_dir(sweep, 0)
        marker = job / launcher.JOB_ID_FILE
        # The job's tasks (its 2 ranks) are the children of submitit's controller, whose
        # pid is the job id; submitit sends them USR2 signal_delay_s before the time limit.
        tasks = children(int(marker.read_text()))
        assert len(tasks) == 2, tasks
        for task in tasks:
            os.kill(task, signal.SIGUSR2)
        hold.unlink()  # the job, held mid-training, meets the signal now
        out = proc.communicate(timeout=240)[0]
    finally:
        end_session(proc)
    assert proc.returncode == 0, out[-3000:]
    ends_like_the_job_not_stopped(sweep, job, "SIGUSR2", epochs=60, out=out)
    # the job ran twice under one job id: the stopped attempt's log is in submitit's folder
    submitit_log = sweep / ".submitit" / marker.read_text().strip()
    assert "Requeued job" in "".join(p.read_text() for p in submitit_log.glob("*_log.*"))


def ends_like_the_job_not_stopped(sweep: Path, job: Path, stopped_by: str, epochs: int, out: str):
    """Both jobs of the sweep are ok; `job` was stopped by `stopped_by`, resumed from its
    last.pt under 2 ranks, and ends with the weights of job 1, which ran straight through."""
    assert [r["status"] for r in rows(sweep)] == ["ok", "ok"], out[-3000:]
    log = (job / "bprun.log").read_text()
    assert f"stopped by {stopped_by}" in log and "resumed from" in log, log[-3000:]
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == epochs
    assert metrics["resumed_from"].endswith("last.pt")
    assert metrics["world_size"] == 2 and (job / "frozen_config.yaml").is_file()
    straight_job = job_dir(sweep, 1)  # one run folder per job, one event file: rank 0 writes
    assert len(list(straight_job.glob("events.out.tfevents.*"))) == 1
    interrupted, straight = weights(job), weights(straight_job)
    assert interrupted.keys() == straight.keys()
    for name in straight:
        assert torch.equal(interrupted[name], straight[name]), name


def test_a_new_sweep_over_an_old_folder_does_not_resume_it(tmp_path):
    """Only the job that wrote its id in the folder resumes there."""

    class Env:
        job_id = "1234"

    folder = tmp_path / "0_job"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.pt").write_bytes(b"")
    (folder / launcher.JOB_ID_FILE).write_text("999\n")  # another job's
    assert launcher.restarted_in(folder, Env()) is False
    assert (folder / launcher.JOB_ID_FILE).read_text() == "1234\n"
    assert launcher.restarted_in(folder, Env()) is True  # the same job, started again


def test_defaults_a_slurm_user_expects():
    from hydra import compose, initialize_config_module

    from bprun.config import register_configs

    register_configs()
    with initialize_config_module("bprun.conf", version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["hydra/launcher=submitit_slurm", "trainer.devices=4"],
            return_hydra_config=True,
        )
    conf = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert conf["_target_"] == "hydra_plugins.bprun_submitit.launcher.SlurmLauncher"
    assert conf["tasks_per_node"] == 4 and conf["gpus_per_node"] == 4  # one rank per GPU
    assert conf["signal_delay_s"] > 0 and conf["max_num_timeout"] > 0 and conf["timeout_min"]
    assert "partition" in conf and "cpus_per_task" in conf
    assert conf["submitit_folder"].endswith(".submitit/%j")


def test_a_job_without_a_result_is_a_failed_return_not_the_end_of_the_sweep(tmp_path):
    """submitit raises when a job ended without a result (scancel, killed): that job is
    recorded as failed and the other jobs' results are still collected."""
    from hydra.core.utils import JobStatus
    from submitit.core.utils import UncompletedJobError

    class Cancelled:
        job_id = "41_0"

        class paths:
            stdout = tmp_path / "41_0_0_log.out"

        def result(self):
            raise UncompletedJobError("Job 41_0 (task: 0) has not produced any output")

    ret = launcher._result(Cancelled(), ["optim.lr=0.1"], 0, tasks=1)
    assert ret.status == JobStatus.FAILED and ret.overrides == ["optim.lr=0.1"]
    assert "41_0" in str(ret._return_value) and "41_0_0_log.out" in str(ret._return_value)


def test_submitit_slurm_without_slurm_is_one_line(tmp_path):
    venv = str(Path(BPRUN).parent)  # bprun and python, but no sbatch or srun on the PATH
    r = subprocess.run(
        [BPRUN, "-m", "hydra/launcher=submitit_slurm", f"hydra.sweep.dir={tmp_path}", "seed=1,2"],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": venv},
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "error: hydra/launcher=submitit_slurm needs SLURM's sbatch and srun on the PATH: run "
        "the sweep on a node of the cluster, or use hydra/launcher=submitit_local to run the "
        "jobs on this machine"
    )
    assert "Traceback" not in r.stderr
