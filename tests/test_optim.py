"""Optimizers and schedulers from the shipped configs: they train, they resume, their lengths fit."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from bprun.build import build_optimizer, build_scheduler
from bprun.config import register_configs
from bprun.errors import BprunError

CONF = Path(__file__).resolve().parents[1] / "conf"
OPTIMS = sorted(p.stem for p in (CONF / "optim").glob("*.yaml"))
SCHEDS = sorted(p.stem for p in (CONF / "sched").glob("*.yaml"))
Plateau = torch.optim.lr_scheduler.ReduceLROnPlateau


@pytest.fixture(scope="module")
def nodes() -> dict:
    """Every optim and sched node as the command line composes it (interpolations resolved)."""
    register_configs()
    out = {}
    with initialize_config_dir(str(CONF), version_base="1.3"):
        for name in OPTIMS:
            out["optim", name] = compose("config", overrides=[f"optim={name}"]).optim
        for name in SCHEDS:
            cfg = compose("config", overrides=[f"sched={name}"])
            out["sched", name] = OmegaConf.create(OmegaConf.to_container(cfg.sched, resolve=True))
    return out


def test_the_configs_the_issue_names_exist():
    assert set(OPTIMS) >= {
        "sgd",
        "momentum",
        "nesterov",
        "adam",
        "adamw",
        "rmsprop",
        "adagrad",
        "radam",
        "nadam",
        "lbfgs",
    }
    assert set(SCHEDS) >= {
        "none",
        "step",
        "multistep",
        "exponential",
        "cosine",
        "warmup_cosine",
        "onecycle",
        "plateau",
    }


# A fixed small problem: 3 classes separated by a random linear map, trained full-batch.
g = torch.Generator().manual_seed(0)
X = torch.randn(64, 10, generator=g)
Y = (X @ torch.randn(10, 3, generator=g)).argmax(1)
EPOCHS = 20


def make(nodes, optim: str, sched: str, lr_scale: float):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    if optim == "muon":  # Muon trains hidden matrices (between the input layer and the head)
        model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), model[2])
    node = nodes["optim", optim].copy()
    if optim != "lbfgs":  # 20 updates at 10x the default lr move every optimizer measurably
        node.lr = node.lr * lr_scale
    opt = build_optimizer(node, model)
    sched, interval = build_scheduler(nodes["sched", sched], opt, 1, EPOCHS)
    return model, opt, sched, interval


def full_loss(model) -> float:
    with torch.no_grad():
        return nn.functional.cross_entropy(model(X), Y).item()


def train_epoch(model, opt, sched, interval) -> None:
    def closure():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(X), Y)
        loss.backward()
        return loss

    opt.step(closure)
    if sched is None:
        return
    if isinstance(sched, Plateau):
        sched.step(full_loss(model))
    else:
        sched.step()


def roundtrip(state: dict) -> dict:
    """What a checkpoint gives back: torch.save, then torch.load(weights_only=True)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("sched", SCHEDS)
@pytest.mark.parametrize("optim", OPTIMS)
def test_every_optimizer_with_every_scheduler_lowers_the_loss_and_resumes(nodes, optim, sched):
    # RAdam's variance warm-up damps its first updates: it gets a larger lr to move as far
    scale = 100.0 if optim == "radam" else 10.0
    model, opt, scheduler, interval = make(nodes, optim, sched, scale)
    before = full_loss(model)
    for _ in range(EPOCHS - 1):
        train_epoch(model, opt, scheduler, interval)
    after = full_loss(model)
    assert math.isfinite(after) and after < 0.95 * before, (before, after)

    # resume from a weights_only round trip of the states, then take one more step on both
    state = roundtrip(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
        }
    )
    model2, opt2, scheduler2, _ = make(nodes, optim, sched, scale)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    if scheduler2 is not None:
        scheduler2.load_state_dict(state["scheduler"])
    train_epoch(model, opt, scheduler, interval)
    train_epoch(model2, opt2, scheduler2, interval)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm([4, 2, 2])  # a norm layer with multi-dimensional weights
        self.fc = nn.Linear(16, 3)
        self.fc_nobias = nn.Linear(3, 3, bias=False)
        self.scale = nn.Parameter(torch.ones(3))  # 1-D: no decay
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.tied = self.fc_nobias  # a shared module: its weight is listed once


def test_no_decay_norm_bias_puts_exactly_biases_and_norm_params_in_a_zero_decay_group(nodes):
    model = Net()
    node = nodes["optim", "adamw"].copy()
    node.no_decay_norm_bias = True
    opt = build_optimizer(node, model)
    assert len(opt.param_groups) == 2
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == node.weight_decay == 0.01
    assert {names[id(p)] for p in decay["params"]} == {
        "conv.weight",
        "fc.weight",
        "fc_nobias.weight",
    }
    assert no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == {
        "conv.bias",
        "bn.weight",
        "bn.bias",
        "ln.weight",
        "ln.bias",
        "fc.bias",
        "scale",
    }
    node.no_decay_norm_bias = False
    plain = build_optimizer(node, model)
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["weight_decay"] == 0.01


def test_no_decay_norm_bias_with_lbfgs_is_a_clear_error(nodes):
    node = nodes["optim", "lbfgs"].copy()
    node.no_decay_norm_bias = True
    with pytest.raises(BprunError, match="no_decay_norm_bias.*LBFGS"):
        build_optimizer(node, Net())


def lrs(nodes, sched: str, updates_per_epoch: int, epochs: int, max_updates=None, **extra):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    node = OmegaConf.merge(nodes["sched", sched], extra)
    scheduler, interval = build_scheduler(node, opt, updates_per_epoch, epochs, max_updates)
    seen = [opt.param_groups[0]["lr"]]
    steps = updates_per_epoch * epochs if interval == "step" else epochs
    if max_updates is not None:
        steps = min(steps, max_updates)
    for _ in range(steps):
        opt.step()
        scheduler.step()
        seen.append(opt.param_groups[0]["lr"])
    return scheduler, seen


def test_warmup_cosine_lengths_follow_the_run(nodes):
    # 7 updates per epoch x 4 epochs = 28 updates; a quarter of them warm up
    _, seen = lrs(nodes, "warmup_cosine", 7, 4, warmup_fraction=0.25)
    assert len(seen) == 29
    warm = seen[:8]
    assert warm[0] == pytest.approx(0.1 * 0.01) and warm == sorted(warm)
    assert seen[7] == pytest.approx(0.1) and max(seen) == pytest.approx(0.1)
    assert seen[8:] == sorted(seen[8:], reverse=True)  # cosine down from the peak
    assert seen[28] == pytest.approx(0.0, abs=1e-12)  # eta_min exactly at the run's end
    # explicit warmup_updates and a max_updates cap
    _, seen = lrs(nodes, "warmup_cosine", 7, 4, max_updates=10, warmup_updates=3)
    assert seen[3] == pytest.approx(0.1) and seen[10] == pytest.approx(0.0, abs=1e-12)


def test_onecycle_length_follows_the_run(nodes):
    scheduler, seen = lrs(nodes, "onecycle", 7, 4)
    assert scheduler.total_steps == 28
    peak = seen.index(max(seen))  # the warm-up phase ends at update 0.3 x 28 - 1 = 7.4
    assert peak in (7, 8) and max(seen) == pytest.approx(0.1, rel=1e-2)
    assert seen[27] == pytest.approx(0.1 / 25 / 1e4)  # the lr of the run's last update
    with pytest.raises(ValueError):  # torch refuses to step past total_steps
        scheduler.step()
    scheduler, _ = lrs(nodes, "onecycle", 7, 4, interval="epoch")
    assert scheduler.total_steps == 4
    scheduler, _ = lrs(nodes, "onecycle", 7, 4, max_updates=9)
    assert scheduler.total_steps == 9


def test_onecycle_cycles_momentum_only_where_the_optimizer_has_it(nodes):
    for optim, cycles in (("sgd", False), ("momentum", True), ("adam", True), ("adagrad", False)):
        _, opt, scheduler, _ = make(nodes, optim, "onecycle", 1.0)
        assert scheduler.cycle_momentum is cycles, optim
        if optim == "sgd":
            assert opt.param_groups[0]["momentum"] == 0.0


def test_scheduler_interval_errors(nodes):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(BprunError, match="sched=plateau.*interval=epoch"):
        build_scheduler(OmegaConf.merge(nodes["sched", "plateau"], {"interval": "step"}), opt, 5, 2)
    with pytest.raises(BprunError, match="sched.interval must be step or epoch"):
        build_scheduler(OmegaConf.merge(nodes["sched", "cosine"], {"interval": "batch"}), opt, 5, 2)


def test_plateau_follows_the_monitored_mode():
    register_configs()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["sched=plateau", "trainer.mode=max"])
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler, interval = build_scheduler(cfg.sched, opt, 5, 2)
    assert isinstance(scheduler, Plateau) and scheduler.mode == "max" and interval == "epoch"


def test_optimizer_configs_say_what_their_names_say(nodes):
    assert nodes["optim", "momentum"].momentum == 0.9
    assert not nodes["optim", "momentum"].get("nesterov", False)
    assert nodes["optim", "nesterov"].momentum == 0.9 and nodes["optim", "nesterov"].nesterov
    assert nodes["optim", "sgd"].momentum == 0.0
    model = nn.Linear(2, 2)
    hidden = nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 4), nn.Linear(4, 2))  # for Muon
    for name in OPTIMS:
        opt = build_optimizer(nodes["optim", name], hidden if name == "muon" else model)
        assert type(opt).__name__.lower().replace("_", "") in {
            "sgd": "sgd",
            "momentum": "sgd",
            "nesterov": "sgd",
            "adamw_schedulefree": "schedulefreeadamw",  # the library's own name
            "muon": "muonadamw",  # Muon for hidden matrices, AdamW for the rest
            "shampoo": "klshampoo",  # heavyball's KL-corrected Shampoo
        }.get(name, name.replace("_", ""))


def test_optimizers_and_schedulers_end_to_end(bprun, tmp_path):
    sweep = tmp_path / "sweep"
    r = bprun(
        "hydra.mode=MULTIRUN",
        f"hydra.sweep.dir={sweep}",
        "optim=nesterov,radam",
        "sched=warmup_cosine,onecycle,plateau",
        "optim.no_decay_norm_bias=true",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=6",
    )
    assert r.returncode == 0
    runs = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))]
    assert len(runs) == 6 and all(m["status"] == "completed" for m in runs)
    assert all(m["updates"] == 12 and math.isfinite(m["test"]["test/loss"]) for m in runs)


def test_lbfgs_end_to_end(bprun):
    r = bprun(
        "optim=lbfgs",
        "optim.max_iter=4",
        "sched=plateau",
        "trainer.max_epochs=2",
        "dataset.batch_size=1000",
    )
    m = r.metrics
    assert m["status"] == "completed" and m["history"][-1]["val/loss"] < m["history"][0]["val/loss"]
