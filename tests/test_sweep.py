"""Sweeps: every job runs and is recorded, the summary, multi-seed statistics, skip_done,
the exit status, a stopped sweep that continues, and parallel jobs sharing the cores."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import time
from datetime import datetime
from pathlib import Path

import joblib
import pytest
from conftest import BPRUN, job_dir

from bprun.sweep import summary as sweep_summary
from bprun.sweep.callback import parallel_jobs, threads_per_job

FAST = ("trainer.fast_dev_run=true",)


def rows(sweep: Path, name: str = "summary.csv") -> list[dict]:
    with (sweep / name).open() as f:
        return list(csv.DictReader(f))


def metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def test_failed_job_is_recorded_and_the_others_finish(bprun, tmp_path):
    r = bprun(
        "optim=sgd", "optim.lr=0.001,0.01,1e30,0.003", "trainer.max_updates=5", "-m", check=False
    )
    sweep = tmp_path / "sweep"
    assert r.returncode == 1, r.output[-3000:]  # non-zero: a job failed, after all of them ran
    table = rows(sweep)
    assert [row["status"] for row in table] == ["ok", "ok", "ok", "failed"]
    ok, failed = table[:3], table[3]
    assert [float(row["best"]) for row in ok] == sorted(float(row["best"]) for row in ok)
    assert [row["rank"] for row in ok] == ["1", "2", "3"] and failed["rank"] == ""
    assert failed["optim.lr"] == "1e+30" and "non-finite" in failed["error"]
    for row in ok:
        m = metrics(Path(row["folder"]))
        assert float(row["best"]) == m["best"]["val/loss"]
        assert float(row["test/acc"]) == m["test"]["test/acc"]
        assert int(row["epochs"]) == m["epochs"] and row["monitor"] == "val/loss"
    assert metrics(Path(failed["folder"]))["status"] == "failed"
    markdown = (sweep / "summary.md").read_text()
    assert "## Jobs that did not finish" in markdown and "non-finite" in markdown

    # One line per job on the console, and the best job as a command that reproduces it.
    lines = r.stdout.splitlines()
    assert sum(line.startswith("[ok]") for line in lines) == 3
    assert sum(line.startswith("[failed]") for line in lines) == 1
    command = next(line.strip() for line in lines if line.startswith("    bprun "))
    args = shlex.split(command)[1:]
    assert "optim.lr=" + ok[0]["optim.lr"] in args
    again = bprun(*args, f"hydra.run.dir={tmp_path / 'again'}")
    assert again.metrics["best"]["val/loss"] == float(ok[0]["best"])


def test_job_that_fails_before_training_still_gets_a_row(bprun, tmp_path):
    r = bprun("trainer.nonfinite=stop,explode", *FAST, "-m", check=False)
    assert r.returncode == 1
    table = rows(tmp_path / "sweep")
    assert [row["status"] for row in table] == ["ok", "failed"]
    failed = table[1]
    assert not (Path(failed["folder"]) / "metrics.json").exists()
    assert "trainer.nonfinite='explode' is not known: choose one of stop, skip" in failed["error"]
    assert "Traceback" not in r.output


def test_multi_seed_mean_and_std_per_configuration(bprun, tmp_path):
    bprun("seed=0,1,2", "optim.lr=0.01,0.03", *FAST, "-m")
    sweep = tmp_path / "sweep"
    by_config: dict[str, list[dict]] = {}
    for row in rows(sweep):
        by_config.setdefault(row["optim.lr"], []).append(metrics(Path(row["folder"])))
    groups = rows(sweep, "summary_seeds.csv")
    assert len(groups) == 2
    for group in groups:
        runs = by_config[group["config"].removeprefix("optim.lr=")]
        best = [m["best"]["val/loss"] for m in runs]
        acc = [m["test"]["test/acc"] for m in runs]
        assert group["runs"] == "3" and group["ok"] == "3"
        assert float(group["val/loss_mean"]) == pytest.approx(statistics.fmean(best))
        assert float(group["val/loss_std"]) == pytest.approx(statistics.stdev(best))
        assert float(group["test/acc_mean"]) == pytest.approx(statistics.fmean(acc))
    means = [float(g["val/loss_mean"]) for g in groups]
    assert means == sorted(means)
    assert "## Over seeds" in (sweep / "summary.md").read_text()


def test_skip_done_reruns_nothing_that_finished(bprun, tmp_path):
    sweep = tmp_path / "sweep"
    bprun("optim.lr=0.01,0.02", *FAST, "-m")
    before = {p: p.stat().st_mtime_ns for p in sweep.glob("*/metrics.json")}
    assert len(before) == 2
    r = bprun("optim.lr=0.01,0.02,0.03", "sweep.skip_done=true", *FAST, "-m")
    assert r.returncode == 0
    assert {p: p.stat().st_mtime_ns for p in before} == before  # not run again
    assert r.stdout.count("[skipped: done]") == 2 and r.stdout.count("[ok]") == 1
    table = rows(sweep)
    assert sorted(row["optim.lr"] for row in table) == ["0.01", "0.02", "0.03"]
    assert all(row["status"] == "ok" and row["best"] for row in table)
    new = next(row for row in table if row["optim.lr"] == "0.03")
    assert Path(new["folder"]).name.startswith("2_optim.lr:0.03")


def test_sweep_switch_with_a_wrong_value_is_a_one_line_error(bprun):
    r = bprun("sweep.skip_done=maybe", "optim.lr=0.01,0.02", *FAST, "-m", check=False)
    assert r.returncode == 1
    assert "sweep.skip_done=maybe: Value 'maybe' is not a valid bool" in r.stderr
    assert "Traceback" not in r.output


@pytest.mark.slow
def test_stopped_sweep_exits_143_and_continues_where_it_stopped(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    args = [
        BPRUN,
        "-m",
        f"paths.data_dir={data_dir}",
        "trainer.threads=1",
        f"hydra.sweep.dir={sweep}",
        "trainer.max_epochs=30",
        "trainer.limit_train_batches=5",
        "optim.lr=0.001,0.002",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 120
        while not (
            (log := job_dir(sweep, 0) / "bprun.log").is_file() and "epoch   1/30" in log.read_text()
        ):
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=120)[0].decode()
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "sweep.skip_done=true" in out
    table = rows(sweep)
    assert [row["status"] for row in table] == ["interrupted"]
    assert not job_dir(sweep, 1).exists()

    r = subprocess.run([*args, "sweep.skip_done=true"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    resumed = metrics(job_dir(sweep, 0))
    assert resumed["status"] == "completed" and resumed["epochs"] == 30
    assert resumed["resumed_from"].endswith("last.pt")
    assert [row["status"] for row in rows(sweep)] == ["ok", "ok"]


def _run_interval(log: Path) -> tuple[datetime, datetime]:
    """From the job's first to its last timestamped line: model built to result table."""
    stamps = re.findall(r"^\[([\d-]+ [\d:,]+)\]", log.read_text(), re.M)
    first, last = (datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f") for t in (stamps[0], stamps[-1]))
    return first, last


def test_joblib_jobs_run_in_parallel_with_their_share_of_threads(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    r = subprocess.run(
        [
            BPRUN,
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            f"hydra.sweep.dir={sweep}",
            f"paths.data_dir={data_dir}",
            "optim.lr=0.01,0.003,1e30",
            "trainer.max_epochs=4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert [row["status"] for row in rows(sweep)] == ["ok", "ok", "failed"]
    (start0, end0), (start1, end1) = (
        _run_interval(job_dir(sweep, j) / "bprun.log") for j in (0, 1)
    )
    assert start1 < end0 and start0 < end1, "the first two jobs did not run at the same time"
    share = max(1, joblib.cpu_count() // 2)  # cores // 2 jobs
    for job in (0, 1, 2):
        assert f"torch threads: {share} (" in (job_dir(sweep, job) / "bprun.log").read_text()


def test_threads_per_parallel_job():
    assert parallel_jobs(-1, 8) == 8 and parallel_jobs(-2, 8) == 7 and parallel_jobs(3, 8) == 3
    assert parallel_jobs(None, 8) == 1
    assert threads_per_job(8, 2) == 4 and threads_per_job(2, 4) == 1 and threads_per_job(3, 2) == 1


def test_summary_order_and_command_quoting(tmp_path):
    def job(name, lr, status, best=None, mode="min"):
        folder = tmp_path / name / ".hydra"
        folder.mkdir(parents=True)
        (folder / "overrides.yaml").write_text(f"- optim.lr={lr}\n- model.name='a b'\n")
        m = {"status": status, "monitor": "val/acc", "mode": mode, "epochs": 1}
        m["best"] = {"val/acc": best, "epoch": 1} if best is not None else {}
        (folder.parent / "metrics.json").write_text(json.dumps(m))

    job("0", 0.1, "completed", 0.5, "max")
    job("1", 0.2, "failed")
    job("2", 0.3, "completed", 0.9, "max")
    job("10", 0.4, "completed")  # no validation: ok, unranked
    result = sweep_summary.summarize(tmp_path, ["optim.lr"])
    assert [j.name for j in result.jobs] == ["2", "0", "10", "1"]
    assert result.keys == ["optim.lr"] and [j.name for j in result.failed] == ["1"]
    assert shlex.split(sweep_summary.best_command(result.best)) == [
        "bprun",
        "optim.lr=0.3",
        "model.name='a b'",
    ]
