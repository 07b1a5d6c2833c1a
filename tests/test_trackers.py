"""Trackers beside TensorBoard: MLflow against a real server, W&B offline, CSV, and what
a tracker that fails does to a run (nothing)."""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import BPRUN, job_dir

from bprun.tracking.background import Background
from bprun.tracking.csv_tracker import CsvBackend

mlflow = pytest.importorskip("mlflow")
MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` on 127.0.0.1 with an SQLite store in a temporary folder."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{self.folder}/mlflow.db",
             "--artifacts-destination", str(self.folder / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            cwd=self.folder,
            stdout=subprocess.DEVNULL,
            stderr=(self.folder / "server.log").open("a"),
            start_new_session=True,  # its uvicorn worker goes with it
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )  # fmt: skip
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise AssertionError(
            "mlflow server did not start: " + (self.folder / "server.log").read_text()[-2000:]
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("mlflow"))
    s.start()
    yield s
    s.stop()


def runs_of(client, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
def test_mlflow_run_params_metrics_and_resume_into_the_same_run(bprun, server, tmp_path):
    uri = f"tracker.mlflow.uri={server.uri}"
    first = bprun("tracker=[tensorboard,mlflow,csv]", uri, "trainer.max_epochs=2", "optim.lr=0.003")
    client = server.client()
    (run,) = runs_of(client, "run")  # the run folder's name
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "completed"
    assert run.info.run_name == "run"
    params = run.data.params
    assert params["optim.lr"] == "0.003" and params["model"] == "mlp"
    assert "optim.lr=0.003" in params["overrides"]
    assert run.data.tags["run_dir"] == str(first.run_dir) and run.data.tags["world_size"] == "1"
    assert [step for step, _ in history(client, run.info.run_id, "val/loss")] == [36, 72]
    saved = torch.load(first.run_dir / "checkpoints" / "last.pt", weights_only=True)
    # what a resume continues: the run id, once MLflow (started beside training) created the
    # run; a checkpoint written before that has none, and the resume finds the run by folder
    assert saved["extra"]["trackers"].get("mlflow", run.info.run_id) == run.info.run_id
    assert run.data.metrics["test/acc"] == pytest.approx(first.metrics["test"]["test/acc"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "metrics.json"} <= artifacts

    second = bprun(f"trainer.resume={first.run_dir}", "trainer.max_epochs=3")
    (resumed,) = runs_of(client, "run")
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert [step for step, _ in history(client, run.info.run_id, "val/loss")] == [36, 72, 108]
    best = second.metrics["best"]["val/loss"]
    assert resumed.data.metrics["best/val/loss"] == pytest.approx(best)

    with (first.run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    epochs = [r for r in rows if r["val/loss"]]
    assert [int(r["step"]) for r in epochs] == [36, 72, 108]
    assert float(epochs[-1]["val/loss"]) == pytest.approx(second.metrics["history"][-1]["val/loss"])


@pytest.mark.slow
def test_a_sweep_is_a_parent_run_with_its_jobs_nested(bprun, server, tmp_path):
    result = bprun(
        "-m", "tracker=[mlflow]", f"tracker.mlflow.uri={server.uri}", "trainer.max_epochs=1",
        "optim.lr=0.001,0.002,0.003", "tracker.mlflow.experiment=lr_sweep",
    )  # fmt: skip
    assert result.returncode == 0, result.output[-2000:]
    runs = runs_of(server.client(), "lr_sweep")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.params["optim.lr"] for r in nested) == ["0.001", "0.002", "0.003"]
    assert {r.data.tags["status"] for r in nested} == {"completed"}
    assert all("val/loss" in r.data.metrics for r in nested)
    assert "summary.md" in {a.path for a in server.client().list_artifacts(parents[0].info.run_id)}
    assert (job_dir(tmp_path / "sweep", 2) / "metrics.json").is_file()


@pytest.mark.slow
def test_a_server_down_mid_run_loses_nothing_once_it_is_back(server, tmp_path, data_dir):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [BPRUN, "tracker=[tensorboard,mlflow]", f"tracker.mlflow.uri={server.uri}",
         "tracker.mlflow.experiment=outage", "tracker.mlflow.exit_timeout_s=240",
         # sends every 0.5 s, and epochs long enough that the outage falls inside the run
         "tracker.mlflow.flush_every_s=0.5", "dataset.batch_size=20", "trainer.max_epochs=30", f"paths.data_dir={data_dir}", "trainer.threads=1",
         "trainer.progress=false", f"hydra.run.dir={run_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        client, deadline = server.client(), time.time() + 120
        while time.time() < deadline:  # the run is logging to the server: now take it away
            runs = runs_of(client, "outage")
            if runs and "val/loss" in runs[0].data.metrics:
                break
            time.sleep(0.3)
        else:
            raise AssertionError("no metrics reached the server")
        server.stop()
        time.sleep(3)
        server.start()
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-2000:]
    warnings = [line for line in output.splitlines() if "tracker mlflow:" in line]
    assert warnings and "training goes on" in warnings[0], output[-2000:]
    assert not any("could not be sent" in line for line in warnings)
    (run,) = runs_of(server.client(), "outage")
    assert run.info.status == "FINISHED"
    steps = [step for step, _ in history(server.client(), run.info.run_id, "val/loss")]
    assert steps == [180 * epoch for epoch in range(1, 31)]  # 3600 examples in batches of 20


def wandb_records(path: Path):
    """The records of a W&B run file: a LevelDB-style log of 32 KiB blocks after a 7-byte
    header, each record a 7-byte header (crc, length, type) and a protobuf."""
    data, pos, block, chunks = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            yield chunks
            chunks = b""
        if kind == 0 and length == 0:
            return


def test_wandb_offline_writes_a_run_folder_with_the_metrics(bprun):
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2 as pb

    result = bprun("tracker=[wandb,csv]", "trainer.max_epochs=1", "trainer.limit_train_batches=5")
    (run_file,) = glob.glob(str(result.run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    logged: dict[str, float] = {}
    config = {}
    for data in wandb_records(Path(run_file)):
        record = pb.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            items = record.history.item  # a key with a slash may come as its nested parts
            logged.update(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
            )
        if record.WhichOneof("record_type") == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    val_loss = result.metrics["history"][-1]["val/loss"]
    assert logged["val/loss"] == pytest.approx(val_loss)
    assert logged["test/acc"] == pytest.approx(result.metrics["test"]["test/acc"])
    assert config["model"] == "mlp"
    assert not list(result.run_dir.glob("events.out.tfevents*"))  # tensorboard not picked
    assert (result.run_dir / "metrics.csv").is_file()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["tracker=[tensorboard,mlfow]"], "did you mean tracker=mlflow"),
        (["tracker=[mlflow]", "tracker.mlflow.uri=ftp://host/db"], "tracker.mlflow.uri=ftp://"),
        (["tracker=[wandb]", "tracker.wandb.mode=online"], "needs a W&B API key"),
        (["tracker.tensorboard=runs/tb"], "tracker.tensorboard='runs/tb' replaces the"),
        (["tracker=csv", "tracker.csv=5"], "set its keys as tracker.csv.<key>="),
    ],
)
def test_bad_tracker_settings_are_one_error_line_before_training(bprun, tmp_path, args, expected):
    os.environ.pop("WANDB_API_KEY", None)
    home = os.environ.get("HOME")
    os.environ["HOME"] = str(tmp_path)  # no ~/.netrc with a W&B key
    try:
        result = bprun(*args, check=False)
    finally:
        if home is not None:
            os.environ["HOME"] = home
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.output[-2000:]
    assert not result.run_dir.exists()


class Flaky:
    """A backend whose store is down for its first `down` calls."""

    def __init__(self, down: int):
        self.down, self.calls, self.got = down, 0, []

    def start(self) -> None:
        pass

    def handle(self, kind, items) -> None:
        self.calls += 1
        if self.calls <= self.down:
            raise ConnectionError("connection refused")
        self.got += [(kind, item) for item in items]

    def stop(self) -> None:
        pass


def test_a_failing_tracker_warns_once_retries_and_delivers_in_order(caplog, monkeypatch):
    monkeypatch.setattr("bprun.tracking.background.PAUSES", (0.01,))
    backend = Flaky(down=3)
    worker = Background("flaky", backend, capacity=100, timeout=10)
    with caplog.at_level(logging.WARNING, logger="bprun"):
        for step in range(5):
            worker.put("metrics", {"loss": float(step)}, step, 0.0)
        worker.put("finish", "completed")
        worker.close()
    steps = [item[1] for kind, item in backend.got if kind == "metrics"]
    assert steps == [0, 1, 2, 3, 4] and backend.got[-1] == ("finish", ("completed",))
    warned = [r.getMessage() for r in caplog.records if "connection refused" in r.getMessage()]
    assert len(warned) == 1 and "training goes on" in warned[0]
    assert not any("could not be sent" in r.getMessage() for r in caplog.records)


def test_a_full_buffer_drops_the_oldest_rows_and_says_how_many_at_exit(caplog, monkeypatch):
    monkeypatch.setattr("bprun.tracking.background.PAUSES", (0.01,))
    backend = Flaky(down=10**9)  # never comes back
    worker = Background("down", backend, capacity=10, timeout=0.2)
    with caplog.at_level(logging.WARNING, logger="bprun"):
        for step in range(50):
            worker.put("metrics", {"loss": 1.0}, step, 0.0)
        worker.close()
    assert len(worker._queue) + len(worker._inflight) == 0  # nothing kept past close
    lost = [r.getMessage() for r in caplog.records if "could not be sent" in r.getMessage()]
    assert len(lost) == 1 and "50 metric rows" in lost[0]


def test_csv_rows_merge_a_step_and_widen_for_new_metrics(tmp_path):
    backend = CsvBackend(tmp_path)
    backend.handle("metrics", [({"train/loss": 1.0, "lr": 0.1}, 10, 0.0)])
    backend.handle("metrics", [({"val/loss": 2.0}, 10, 0.0), ({"train/loss": 0.5}, 20, 0.0)])
    backend.stop()
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert rows == [
        {"step": "10", "train/loss": "1.0", "lr": "0.1", "val/loss": "2.0"},
        {"step": "20", "train/loss": "0.5", "lr": "", "val/loss": ""},
    ]
    resumed = CsvBackend(tmp_path, purge_step=15)  # a resume from step 14 drops step 20
    resumed.handle("metrics", [({"train/loss": 0.4}, 20, 0.0)])
    resumed.stop()
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [(r["step"], r["train/loss"]) for r in rows] == [("10", "1.0"), ("20", "0.4")]
