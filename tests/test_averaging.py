"""Averaged weights (EMA, SWA): the averages themselves, their effect, checkpoints and resume."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from test_checkpoint import saved_update, start, wait_for_update
from torch import nn

from bprun.data import InMemoryLoader
from bprun.engine import Trainer, TrainerSettings
from bprun.engine.averaging import averaging_callbacks
from bprun.engine.settings import EMA, SWA
from bprun.errors import BprunError


def noisy_problem(n, seed):
    """Two informative features and 25% flipped labels: small batches make SGD jitter."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] - x[:, 1] > 0).long()
    flip = torch.rand(n, generator=g) < 0.25
    return x, torch.where(flip, 1 - y, y)


def make_trainer(kind="ema", lr=0.1, model=None, **settings):
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2))
    s = TrainerSettings(progress=False, **settings)
    callbacks = averaging_callbacks(s, model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    trainer = Trainer(s, model, nn.CrossEntropyLoss(), opt, num_classes=2, callbacks=callbacks)
    return trainer, (callbacks[0] if callbacks else None)


class Recorder:
    """The model's weights after every update, as the averaging callback sees them."""

    def __init__(self, model):
        self.model, self.after_update, self.after_epoch = model, [], []

    def on_update_end(self, trainer):
        self.after_update.append([p.detach().clone() for p in self.model.parameters()])

    def on_validation(self, trainer, metrics, val):
        self.after_epoch.append([p.detach().clone() for p in self.model.parameters()])


def test_averaging_is_off_by_default_and_adds_no_hook():
    trainer, avg = make_trainer(max_epochs=1)
    assert avg is None and averaging_callbacks(TrainerSettings(), nn.Linear(2, 2)) == []
    assert trainer._on_update_end == [] and trainer._stateful == []
    assert "averaging" not in trainer.state_dict()["callbacks"]


def test_ema_is_the_exponential_average_of_the_updates_with_warmup_and_every_n():
    x, y = noisy_problem(96, 0)
    ema = EMA(decay=0.9, warmup=True, every_n_updates=2)
    trainer, avg = make_trainer(max_epochs=2, ema=ema)
    rec = Recorder(trainer.module)
    trainer.callbacks.append(rec)
    trainer._on_update_end.insert(0, rec.on_update_end)
    expected = [p.detach().clone() for p in trainer.module.parameters()]  # starts at the init
    trainer.fit(InMemoryLoader(x, y, 16, shuffle=True), None)
    n = 0
    for update, weights in enumerate(rec.after_update, start=1):
        if update % 2:
            continue
        d = min(0.9, (1 + n) / (10 + n))
        expected = [d * e + (1 - d) * w for e, w in zip(expected, weights, strict=True)]
        n += 1
    assert avg.count == n == 6
    got = [avg.average[k] for k, _ in trainer.module.named_parameters()]
    for g, e, raw in zip(got, expected, trainer.module.parameters(), strict=True):
        torch.testing.assert_close(g, e)
        assert not torch.allclose(g, raw)  # the average is not the raw weights


def test_ema_validates_better_than_raw_weights_on_a_noisy_small_batch_run_and_tests_with_it():
    x, y = noisy_problem(512, 1)
    xv, yv = noisy_problem(2000, 2)
    trainer, avg = make_trainer(
        lr=0.5, max_epochs=3, ema=EMA(decay=0.98), monitor="val_ema/loss", log_every_n_updates=8
    )
    val = InMemoryLoader(xv, yv, 1000)
    trainer.check_monitors()  # val_ema/* are known before training
    trainer.fit(InMemoryLoader(x, y, 4, shuffle=True, seed=0), val)
    for m in trainer.history:
        assert m["val_ema/loss"] < m["val/loss"] - 0.01, m
    assert trainer.best["epoch"] in (1, 2, 3) and "val_ema/loss" in trainer.best
    raw = trainer.evaluate(val, "v")["v/loss"]
    assert raw == pytest.approx(trainer.history[-1]["val/loss"])  # swapped back after validating
    tested = trainer.test(val)  # with the best epoch's averaged weights
    assert tested["test/loss"] == pytest.approx(trainer.best["val_ema/loss"], rel=1e-6)


def test_swa_averages_epoch_end_weights_from_its_start_epoch_at_the_swa_lr():
    x, y = noisy_problem(96, 3)
    swa = SWA(start_epoch=2, lr=0.02, anneal_epochs=2, anneal_strategy="linear")
    trainer, avg = make_trainer(max_epochs=4, swa=swa)
    rec = Recorder(trainer.module)
    trainer.callbacks.append(rec)
    trainer._on_validation.insert(0, rec.on_validation)
    trainer.fit(InMemoryLoader(x, y, 16, shuffle=True), InMemoryLoader(x, y, 100))
    mean = [torch.stack(ws).mean(0) for ws in zip(*rec.after_epoch[1:], strict=True)]
    for name_p, m in zip(trainer.module.named_parameters(), mean, strict=True):
        torch.testing.assert_close(avg.average[name_p[0]], m)
    assert avg.count == 3
    # linear anneal from 0.1 over 2 epochs: half-way in epoch 2, swa.lr from epoch 3
    assert [round(h["lr"], 6) for h in trainer.history] == [0.1, 0.06, 0.02, 0.02]
    # before the start the average is the weights themselves
    assert trainer.history[0]["val_swa/loss"] == trainer.history[0]["val/loss"]
    assert trainer.history[-1]["val_swa/loss"] != trainer.history[-1]["val/loss"]


def test_swa_recomputes_batch_norm_statistics_before_the_test():
    x, y = noisy_problem(96, 4)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    trainer, avg = make_trainer(model=model, max_epochs=3, swa=SWA(start_epoch=2))
    train = InMemoryLoader(x, y, 16, shuffle=True)
    trainer.fit(train, None)
    trainer.test(InMemoryLoader(x, y, 100))
    bn = model[1]
    h = model[0](x).detach()  # the statistics of one full pass over the training inputs
    torch.testing.assert_close(bn.running_mean, h.mean(0), rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.1  # update_bn restores the momentum it overrides


def test_swa_batch_norm_statistics_on_a_rank_are_the_one_process_statistics():
    """Under DDP each rank's loader holds its share of each batch; the BatchNorm pass before the
    test reads the whole batches, so every rank ends with the statistics of one process."""
    x, y = noisy_problem(96, 6)
    stats = []
    for rank_loader in (None, InMemoryLoader(x, y, 8, shuffle=True).shard(1, 2)):
        model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
        trainer, avg = make_trainer(model=model, max_epochs=3, swa=SWA(start_epoch=2))
        trainer.fit(InMemoryLoader(x, y, 16, shuffle=True), None)
        if rank_loader is not None:
            avg.train_loader = rank_loader  # what rank 1 of 2 holds, with the same global batch
        avg.on_test_start(trainer)
        stats.append((model[1].running_mean.clone(), model[1].running_var.clone()))
    (mean_one, var_one), (mean_rank, var_rank) = stats
    assert torch.equal(mean_rank, mean_one) and torch.equal(var_rank, var_one)


def test_resume_restores_the_average_and_a_mismatch_is_refused(tmp_path):
    x, y = noisy_problem(64, 5)
    trainer, avg = make_trainer(max_epochs=1, ema=EMA(decay=0.9))
    trainer.fit(InMemoryLoader(x, y, 16), None)
    state = trainer.state_dict()
    fresh, fresh_avg = make_trainer(max_epochs=1, ema=EMA(decay=0.9))
    fresh.load_state_dict(state)
    for k, v in avg.average.items():
        assert torch.equal(fresh_avg.average[k], v)
    assert fresh_avg.count == avg.count == 4
    swa, _ = make_trainer(max_epochs=1, swa=SWA(start_epoch=1))
    with pytest.raises(BprunError, match="holds EMA weights but this run averages by SWA"):
        swa.load_state_dict(state, "x.pt")


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"ema": EMA(decay=1.5)}, "trainer.ema.decay must be between 0 and 1"),
        ({"ema": EMA(decay=0.9, device="cuda")}, "trainer.ema.device='cuda' is not known"),
        ({"ema": EMA(decay=0.9, every_n_updates=0)}, "trainer.ema.every_n_updates must be at"),
        ({"swa": SWA(start_epoch=9), "max_epochs": 3}, "start_epoch=9 must lie in 1..trainer"),
        ({"swa": SWA(start_epoch=1, lr=-1.0)}, "trainer.swa.lr must be positive"),
        ({"swa": SWA(start_epoch=1, anneal_strategy="exp")}, "anneal_strategy='exp'"),
        ({"swa": SWA(start_epoch=1), "ema": EMA(decay=0.9)}, "are both set"),
    ],
)
def test_bad_averaging_settings_are_one_line_errors(settings, message):
    with pytest.raises(BprunError, match=message):
        TrainerSettings(**settings)


def test_monitoring_the_average_without_averaging_names_the_metrics():
    x, y = noisy_problem(32, 6)
    trainer, _ = make_trainer(max_epochs=1, monitor="val_ema/loss")
    with pytest.raises(BprunError, match="val_ema/loss is not a metric of this run: did you mean"):
        trainer.check_monitors()  # before training
    with pytest.raises(BprunError, match="val_ema/loss is not a metric of this run"):
        trainer.fit(InMemoryLoader(x, y, 16), InMemoryLoader(x, y, 32))


@pytest.mark.slow
def test_eval_task_tests_the_averaged_weights_of_a_run(bprun, tmp_path):
    """A CNN with BatchNorm under SWA: the run's test and task=eval agree, both on the average."""
    trained = bprun(
        "dataset=digits",
        "model=cnn",
        "model.channels=[8,16]",
        "trainer.max_epochs=2",
        "trainer.swa.start_epoch=2",
        "trainer.swa.lr=0.01",
        "trainer.checkpoint.monitor=val_swa/loss",
    )
    m = trained.metrics
    assert m["swa"]["averaging_steps"] == 1 and "val_swa/acc" in m["final"]
    assert "testing the SWA weights" in trained.stdout
    best = json.loads((trained.run_dir / "metrics.json").read_text())["best"]
    assert "val_swa/loss" in best
    bprun("task=eval", f"ckpt={trained.run_dir}", f"hydra.run.dir={tmp_path}/eval")
    out = json.loads((trained.run_dir / "checkpoints" / "eval.json").read_text())
    assert out["weights"] == "swa"
    assert out["test/acc"] == pytest.approx(m["test"]["test/acc"])
    assert out["test/loss"] == pytest.approx(m["test"]["test/loss"], rel=1e-5)


@pytest.mark.slow
def test_sigkill_then_resume_restores_the_ema_exactly(bprun, data_dir, tmp_path):
    args = [
        "dataset=digits",
        "model=mlp",
        "model.hidden=[32]",
        "model.dropout=0.1",
        "trainer.max_epochs=2",
        "trainer.ema.decay=0.95",
        "trainer.ema.warmup=true",
        "trainer.ema.every_n_updates=2",
        "trainer.checkpoint.every_n_updates=1",
        "trainer.monitor=val_ema/loss",
    ]
    reference = bprun(*args, f"hydra.run.dir={tmp_path}/ref")
    total = reference.metrics["updates"]
    expected = torch.load(reference.run_dir / "checkpoints" / "last.pt", weights_only=True)
    run_dir = tmp_path / "killed"
    proc = start(args, data_dir, run_dir)
    wait_for_update(proc, run_dir / "checkpoints" / "last.pt", 25)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert saved_update(run_dir / "checkpoints" / "last.pt") < total
    resumed = bprun(f"trainer.resume={run_dir}")
    got = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    want, have = expected["callbacks"]["averaging"], got["callbacks"]["averaging"]
    assert have["count"] == want["count"] == total // 2
    for k, v in want["weights"].items():
        assert torch.equal(have["weights"][k], v), k
    assert resumed.metrics["test"] == reference.metrics["test"]
