"""TensorBoard: what a run writes, read back by TensorBoard's own reader and its server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import job_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams import metadata as hp
from torch import nn

from bprun.data.loader import InMemoryLoader
from bprun.engine.settings import TrainerSettings
from bprun.engine.trainer import Trainer
from bprun.errors import BprunError
from bprun.tracking.callbacks import Graph, Histograms, LearningRates, tensorboard_callbacks
from bprun.tracking.tensorboard import Tracker

TENSORBOARD = str(Path(sys.executable).with_name("tensorboard"))


def events(run_dir: Path) -> EventAccumulator:
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0})
    ea.Reload()
    return ea


def hparams_of(ea: EventAccumulator) -> tuple[dict, int]:
    content = ea.PluginTagToContent("hparams")
    start = hp.parse_session_start_info_plugin_data(content[hp.SESSION_START_INFO_TAG])
    end = hp.parse_session_end_info_plugin_data(content[hp.SESSION_END_INFO_TAG])
    values = {k: v.string_value or v.number_value for k, v in start.hparams.items()}
    return values, end.status


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, data_dir) -> Path:
    """Two jobs with every TensorBoard extra on, shared by the tests below."""
    sweep = tmp_path_factory.mktemp("tb") / "sweep"
    r = subprocess.run(
        [
            str(Path(sys.executable).with_name("bprun")),
            "-m",
            f"paths.data_dir={data_dir}",
            f"hydra.sweep.dir={sweep}",
            "trainer.threads=1",
            "optim=sgd,adamw",
            "trainer.max_epochs=2",
            "trainer.limit_train_batches=5",
            "trainer.log_histograms_every_n_epochs=2",
            "trainer.log_graph=true",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return sweep


def test_scalars_and_hparams_for_the_hparams_tab(sweep):
    for job, optim in (("0", "sgd"), ("1", "adamw")):
        run = job_dir(sweep, job)
        ea = events(run)
        scalars = set(ea.Tags()["scalars"])
        assert {"lr/group0", "train/loss", "val/loss", "best/val/loss", "test/acc"} <= scalars
        assert "hp_metric" not in scalars
        assert not list(run.glob("*/**/events.out.tfevents.*"))  # no hparams sub-run
        values, status = hparams_of(ea)
        m = json.loads((run / "metrics.json").read_text())
        assert values["optim"] == optim and values["model"] == "mlp"
        assert values["dataset"] == "mnist1d" and values["sched"] == "none"
        assert values["optim.lr"] == pytest.approx(0.05 if optim == "sgd" else 0.003)
        assert values["trainer.max_epochs"] == 2 and values["seed"] == 0
        assert not any(k.startswith(("paths.", "hydra", "sweep")) for k in values)
        assert status == api_pb2.STATUS_SUCCESS
        best = ea.Scalars("best/val/loss")[-1]
        assert best.value == pytest.approx(m["best"]["val/loss"])
        assert best.step == m["updates"]


def test_histograms_in_the_chosen_epoch_and_the_graph(sweep):
    ea = events(job_dir(sweep, 0))
    tags = ea.Tags()
    assert tags["graph"] is True
    weights = {t.removeprefix("weights/") for t in tags["histograms"] if t.startswith("weights/")}
    grads = {t.removeprefix("grads/") for t in tags["histograms"] if t.startswith("grads/")}
    assert weights == grads and len(weights) >= 4  # every layer's weight and bias
    for tag in tags["histograms"]:
        assert [e.step for e in ea.Histograms(tag)] == [10]  # end of epoch 2, 5 updates each


def test_tensorboard_server_serves_the_runs(sweep):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [TENSORBOARD, "--logdir", str(sweep), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    # TensorBoard names each run by its folder: the job number and its overrides.
    runs = [job_dir(sweep, 0).name, job_dir(sweep, 1).name]
    assert "optim:sgd" in runs[0] and "optim:adamw" in runs[1]
    try:
        url = f"http://127.0.0.1:{port}/data/plugin/scalars/tags"
        deadline, tags = time.time() + 90, {}
        while time.time() < deadline:
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    tags = json.load(response)
            except OSError:
                pass
            if set(runs) <= set(tags) and all("best/val/loss" in tags[r] for r in runs):
                break
            time.sleep(0.5)
        assert set(runs) <= set(tags), tags
        for run in runs:
            assert {"lr/group0", "val/loss", "best/val/loss", "test/acc"} <= set(tags[run])
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# ---------------------------------------------------------------- in-process trainer
def problem(n: int = 120):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def fit(tmp_path: Path, settings: TrainerSettings, model=None, optimizer=None, **loader):
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.1)
    callbacks = tensorboard_callbacks(settings, tmp_path)
    trainer = Trainer(
        settings,
        model,
        nn.CrossEntropyLoss(),
        optimizer,
        num_classes=3,
        callbacks=callbacks,
        tracker=Tracker(tmp_path),
    )
    x, y = problem()
    trainer.fit(InMemoryLoader(x, y, 10, shuffle=True, **loader), InMemoryLoader(x, y, 100))
    trainer.tracker.close()
    return trainer


def test_nothing_in_the_hot_loop_by_default(tmp_path):
    assert tensorboard_callbacks(TrainerSettings(), None) == []
    callbacks = tensorboard_callbacks(TrainerSettings(), tmp_path)
    assert [type(c) for c in callbacks] == [LearningRates]
    trainer = fit(tmp_path, TrainerSettings(progress=False, max_epochs=1))
    assert trainer._on_update_end == [] and trainer._on_before_step == []
    tags = events(tmp_path).Tags()
    assert tags["histograms"] == [] and tags["graph"] is False


def test_learning_rate_of_every_parameter_group(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.01}], lr=0.1
    )
    s = TrainerSettings(progress=False, max_epochs=2, log_every_n_updates=4)
    fit(tmp_path, s, model, optimizer)
    ea = events(tmp_path)
    steps = [e.step for e in ea.Scalars("lr")]
    for group, lr in ((0, 0.1), (1, 0.01)):
        logged = ea.Scalars(f"lr/group{group}")
        assert [e.step for e in logged] == sorted(set(steps))  # at the trainer's log steps
        assert all(e.value == pytest.approx(lr) for e in logged)


def test_gradient_histograms_on_the_last_update_with_accumulation_and_max_updates(tmp_path):
    s = TrainerSettings(
        progress=False, max_epochs=3, accumulate=4, log_histograms_every_n_epochs=2
    )  # 12 batches, windows of 4: 3 updates per epoch; epoch 2 ends at update 6
    fit(tmp_path / "a", s)
    ea = events(tmp_path / "a")
    assert [e.step for e in ea.Histograms("grads/0.weight")] == [6]
    assert [e.step for e in ea.Histograms("weights/2.bias")] == [6]
    s = TrainerSettings(
        progress=False, max_epochs=3, max_updates=16, log_histograms_every_n_epochs=2
    )
    fit(tmp_path / "b", s)  # 12 updates per epoch: stops in epoch 2, at update 16
    ea = events(tmp_path / "b")
    assert [e.step for e in ea.Histograms("grads/0.weight")] == [16]
    assert [e.step for e in ea.Histograms("weights/0.weight")] == [16]


def test_histogram_interval_below_one_is_an_error(tmp_path):
    with pytest.raises(BprunError, match="log_histograms_every_n_epochs must be at least 1"):
        tensorboard_callbacks(TrainerSettings(log_histograms_every_n_epochs=0), tmp_path)
    assert isinstance(
        tensorboard_callbacks(TrainerSettings(log_histograms_every_n_epochs=3), tmp_path)[1],
        Histograms,
    )


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        if torch.jit.is_tracing():
            raise RuntimeError("cannot be traced")
        return self.linear(x)


def test_graph_that_cannot_be_traced_is_a_warning(tmp_path, caplog):
    s = TrainerSettings(progress=False, max_epochs=1, log_graph=True)
    with caplog.at_level("WARNING", logger="bprun"):
        trainer = fit(tmp_path / "bad", s, Untraceable())
    assert "trainer.log_graph: could not trace Untraceable" in caplog.text
    assert trainer.history and events(tmp_path / "bad").Tags()["graph"] is False
    assert isinstance(tensorboard_callbacks(s, tmp_path)[-1], Graph)


def test_graph_leaves_the_results_unchanged(tmp_path):
    def dropout_net():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))

    on = fit(
        tmp_path / "on",
        TrainerSettings(progress=False, max_epochs=2, log_graph=True),
        dropout_net(),
    )
    off = fit(tmp_path / "off", TrainerSettings(progress=False, max_epochs=2), dropout_net())
    assert events(tmp_path / "on").Tags()["graph"] is True
    strip = ("time/", "throughput/")
    assert [{k: v for k, v in h.items() if not k.startswith(strip)} for h in on.history] == [
        {k: v for k, v in h.items() if not k.startswith(strip)} for h in off.history
    ]
