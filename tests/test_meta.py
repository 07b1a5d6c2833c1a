"""task=meta: MAML's meta-gradient against one computed by hand, the effect of meta-learning on
held-out sine tasks, exact resume after SIGTERM, and one-line errors, through the real command."""

from __future__ import annotations

import json
import signal
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from test_checkpoint import start
from torch import nn
from torch.autograd.functional import hessian, jacobian

from bprun.config import register_configs
from bprun.errors import BprunError
from bprun.meta import maml
from bprun.meta.settings import MetaSettings
from bprun.meta.sine import SineTasks
from bprun.meta.trainer import Learner, MetaTrainer

CONF = Path(__file__).resolve().parents[1] / "conf"


# ---------------------------------------------------------------------- the meta-gradient
def tiny_tasks():
    """A 1-4-1 tanh network in float64 and three tasks of 4 support and 5 query points."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.linspace(-2, 2, 9, dtype=torch.float64).repeat(3, 1).unsqueeze(-1)
    y = torch.stack([torch.sin(x[i] * (i + 1)) * (i + 1) for i in range(3)])
    return model, (x[:, :4], y[:, :4]), (x[:, 4:], y[:, 4:])


def by_hand(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The tiny network's MSE with its weights unpacked from one vector, written out."""
    w1, b1, w2, b2 = theta[:4].view(4, 1), theta[4:8], theta[8:12].view(1, 4), theta[12:]
    return ((torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y) ** 2).mean()


def reference(model, support, query, steps: int, lr: float):
    """(second-order, first-order) meta-gradients from the chain rule: after steps
    theta_k = theta_{k-1} - lr g(theta_{k-1}), d theta_k / d theta_0 is the product of
    (I - lr H(theta_j)), and the meta-gradient its transpose times the query gradient."""
    theta0 = torch.cat([p.detach().flatten() for p in model.parameters()])
    eye = torch.eye(len(theta0), dtype=theta0.dtype)
    second, first = [], []
    for xs, ys, xq, yq in zip(*support, *query, strict=True):
        support_loss = partial(by_hand, x=xs, y=ys)
        theta, d_theta = theta0, eye
        for _ in range(steps):
            d_theta = (eye - lr * hessian(support_loss, theta)) @ d_theta
            theta = theta - lr * jacobian(support_loss, theta)
        query_grad = jacobian(partial(by_hand, x=xq, y=yq), theta)
        second.append(d_theta.T @ query_grad)
        first.append(query_grad)
    return torch.stack(second).mean(0), torch.stack(first).mean(0)


@pytest.mark.parametrize("steps", [1, 2])
def test_meta_gradient_is_the_chain_rule_through_the_inner_steps(steps):
    model, support, query = tiny_tasks()
    lr = 0.3  # large enough that the second-order term is a large part of the gradient

    def meta_gradient(first_order: bool) -> torch.Tensor:
        model.zero_grad()
        maml.meta_loss(model, nn.MSELoss(), support, query, steps, lr, first_order).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    second, first = reference(model, support, query, steps, lr)
    assert torch.allclose(meta_gradient(first_order=False), second, rtol=1e-9, atol=1e-12)
    assert torch.allclose(meta_gradient(first_order=True), first, rtol=1e-9, atol=1e-12)
    assert (second - first).norm() > 0.1 * second.norm()  # the two differ, and not by rounding


def test_adaptation_losses_are_plain_gradient_steps_that_leave_the_weights_as_they_are():
    model, support, query = tiny_tasks()
    before = [p.detach().clone() for p in model.parameters()]
    losses = maml.adaptation_losses(model, nn.MSELoss(), support, query, steps=3, lr=0.1)
    assert losses.shape == (4, 3)  # (steps + 1, tasks)
    for i in range(3):
        support_loss = partial(by_hand, x=support[0][i], y=support[1][i])
        theta = torch.cat([p.flatten() for p in before])
        for step in range(4):
            want = by_hand(theta, query[0][i], query[1][i]).item()
            assert losses[step, i].item() == pytest.approx(want, rel=1e-9)
            theta = theta - 0.1 * jacobian(support_loss, theta)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


# ---------------------------------------------------------------------- the parts
def test_sine_tasks_are_the_papers_and_follow_the_generator():
    tasks = SineTasks()
    batch = tasks.sample(2000, 10, 5, torch.Generator().manual_seed(1))
    assert batch.x.shape == batch.y.shape == (2000, 15, 1)
    assert batch.support[0].shape == (2000, 10, 1) and batch.query[0].shape == (2000, 5, 1)
    assert -5 <= batch.x.min() < -4.9 and 4.9 < batch.x.max() <= 5
    peak = batch.y.abs().amax(dim=(1, 2))
    assert peak.max() <= 5 and 4.5 < peak.max()  # amplitudes up to 5
    again = tasks.sample(2000, 10, 5, torch.Generator().manual_seed(1))
    assert torch.equal(batch.y, again.y)
    with pytest.raises(BprunError, match=r"dataset.phase must be \[low, high\]"):
        SineTasks(phase=(1.0, 0.0))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("shots", 0, "meta.shots must be at least 1, got 0"),
        ("inner_steps", 0, "meta.inner_steps must be at least 1"),
        ("inner_lr", 0.0, "meta.inner_lr must be positive"),
        ("tasks_per_batch", -1, "meta.tasks_per_batch must be at least 1"),
        ("eval_steps", 0, "meta.eval_steps must be at least 1"),
    ],
)
def test_bad_meta_settings_are_one_line_errors(key, value, message):
    with pytest.raises(BprunError, match=message) as e:
        MetaSettings(**{key: value})
    assert "\n" not in str(e.value)


def test_a_training_checkpoint_is_not_resumed_as_meta_learning():
    model, _, _ = tiny_tasks()
    learner = Learner(model, torch.optim.Adam(model.parameters()))
    trainer = MetaTrainer(MetaSettings(), SineTasks(), learner, nn.MSELoss(), baseline=None)
    with pytest.raises(BprunError, match="written by task=train, not task=meta"):
        trainer.load_state_dict({"model": model.state_dict(), "progress": {"update": 3}})


def test_maml_sine_is_the_papers_setup():
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("config", overrides=["+experiment=maml_sine"])
    assert cfg.task == "meta" and cfg.dataset._target_ == "bprun.meta.sine.SineTasks"
    assert list(cfg.model.hidden) == [40, 40] and cfg.model.activation == "relu"
    assert cfg.optim._target_ == "torch.optim.Adam" and cfg.optim.lr == 1e-3
    m = cfg.meta
    assert (m.inner_steps, m.inner_lr, m.tasks_per_batch, m.shots) == (1, 0.01, 25, 10)
    assert not m.first_order and cfg.sched._target_ is None


# ---------------------------------------------------------------------- end to end
def run_in_process(run_dir: Path, *overrides: str) -> dict:
    """`bprun <overrides>` without a new process (no start-up cost): its metrics.json."""
    from bprun.checks import compose
    from bprun.tasks import meta

    register_configs()
    cfg = compose(["trainer.threads=1", "trainer.progress=false", *overrides])
    meta.run(cfg, run_dir, list(overrides))
    return json.loads((run_dir / "metrics.json").read_text())


def test_maml_adapts_in_one_step_where_the_jointly_trained_baseline_does_not(bprun, tmp_path):
    """The paper's figure in miniature: 500 meta-iterations (of its 70,000)."""
    r = bprun("experiment=maml_sine", "meta.iterations=500")
    m = r.metrics
    assert m["status"] == "completed" and m["algorithm"] == "maml" and m["iterations"] == 500
    t = m["test"]
    assert t["test/mse_1step"] < 0.75 * t["test/mse_0step"]
    assert t["test/mse_1step"] < 0.75 * t["test/baseline_mse_1step"]
    assert t["test/mse_10step"] < t["test/mse_1step"]
    assert len(m["adaptation"]["maml"]["mse"]) == len(m["adaptation"]["baseline"]["mse"]) == 11
    assert m["adaptation"]["maml"]["tasks"] == 500
    printed = r.output[r.output.index("Query MSE on 500 held-out tasks") :].splitlines()
    assert printed[2].split()[:2] == ["maml", f"{t['test/mse_0step']:.3f}"]
    assert printed[3].split()[:2] == ["baseline", f"{t['test/baseline_mse_0step']:.3f}"]
    assert (r.run_dir / "checkpoints" / "last.pt").is_file()
    assert list(r.run_dir.glob("events.out.tfevents.*"))

    overrides = ["+experiment=maml_sine", "meta.iterations=500", "meta.first_order=true"]
    fo = run_in_process(tmp_path / "fomaml", *overrides, "meta.baseline=false")
    assert fo["algorithm"] == "fomaml" and list(fo["adaptation"]) == ["fomaml"]
    assert fo["test"]["test/mse_1step"] < 0.85 * fo["test"]["test/mse_0step"]


def saved_iteration(path: Path) -> int:
    try:
        return torch.load(path, weights_only=True)["progress"]["iteration"]
    except Exception:
        return -1


def test_sigterm_then_resume_ends_on_the_weights_of_an_uninterrupted_run(bprun, data_dir, tmp_path):
    args = [
        "experiment=maml_sine",
        "meta.eval_tasks=20",
        "trainer.log_every_n_updates=7",  # windows that a stop cuts in the middle
        "trainer.checkpoint.every_n_updates=10",
    ]
    run_dir = tmp_path / "stopped"
    proc = start([*args, "meta.iterations=100000"], data_dir, run_dir)
    deadline = time.time() + 120
    while saved_iteration(run_dir / "checkpoints" / "last.pt") < 10:
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in out, out
    stopped = saved_iteration(run_dir / "checkpoints" / "last.pt")
    assert f"stopped by SIGTERM after meta-iteration {stopped}; saved " in out
    assert f"bprun trainer.resume={run_dir}" in out
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "interrupted"
    assert 10 <= stopped < 200, "the signal came too late to stop the run midway"

    resumed = bprun(f"trainer.resume={run_dir}", "meta.iterations=200")
    assert f"at meta-iteration {stopped}" in resumed.output
    reference = run_in_process(tmp_path / "ref", "+" + args[0], *args[1:], "meta.iterations=200")
    got = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    want = torch.load(tmp_path / "ref" / "checkpoints" / "last.pt", weights_only=True)
    assert got["progress"]["iteration"] == want["progress"]["iteration"] == 200
    for part in ("learner", "baseline"):
        for key, value in want[part]["model"].items():
            assert torch.equal(got[part]["model"][key], value), f"{part} {key}"
        for i, moments in want[part]["optimizer"]["state"].items():
            for name, tensor in moments.items():
                assert torch.equal(got[part]["optimizer"]["state"][i][name], tensor)
    assert resumed.metrics["test"] == reference["test"]
    assert resumed.metrics["history"] == reference["history"]
    assert resumed.metrics["status"] == "completed"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["experiment=maml_sine", "meta.shots=0"], "meta.shots must be at least 1, got 0"),
        (["dataset=sine_tasks"], "it is a distribution of tasks, for task=meta"),
    ],
)
def test_bad_input_is_one_line_and_a_non_zero_exit(bprun, args, message):
    r = bprun(*args, check=False)
    assert r.returncode == 1 and "Traceback" not in r.output, r.output
    lines = [line for line in r.output.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and message in lines[0], r.output
    assert not r.run_dir.exists()  # nothing left behind


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task=meta"], "task=meta learns from a distribution of tasks, and dataset=bprun.data"),
        (["+experiment=maml_sine", "trainer.max_epochs=3"], "trainer.max_epochs is not used by"),
        (["+experiment=maml_sine", "model.norm=batch"], "use model.norm=layer or none"),
        (["+experiment=maml_sine", "sched=plateau"], "sched=plateau reads a validation metric"),
        (["+experiment=maml_sine", "dataset.x_range=[1,1]"], "dataset.x_range must be [low, high]"),
    ],
)
def test_what_task_meta_cannot_run_is_refused_before_it_starts(tmp_path, overrides, message):
    with pytest.raises(BprunError) as e:
        run_in_process(tmp_path, *overrides)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "metrics.json").exists()


def test_fast_dev_run_is_a_short_smoke_test_without_checkpoints(tmp_path):
    m = run_in_process(tmp_path, "+experiment=maml_sine", "trainer.fast_dev_run=true")
    assert m["status"] == "completed" and m["iterations"] == 2
    assert m["adaptation"]["maml"]["tasks"] == 10
    assert not (tmp_path / "checkpoints").exists()
