"""Instruments of backpropagation: gradient flow, the vanishing/exploding watch, dead units,
anomaly location, the gradient check and the learning-rate finder."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from matplotlib import image as mpimg
from torch import nn

from bprun.build import build_data, build_loss, build_model, build_problem
from bprun.config import register_configs
from bprun.data import InMemoryLoader
from bprun.diagnostics import diagnostic_callbacks
from bprun.diagnostics.anomaly import AnomalyLocator
from bprun.diagnostics.dead_units import DeadUnits
from bprun.diagnostics.grad_flow import GradientMonitor
from bprun.diagnostics.gradcheck import check_gradients
from bprun.diagnostics.lr_find import _Sweep, find_lr, suggest
from bprun.diagnostics.settings import GradcheckSettings, LrFindSettings
from bprun.diagnostics.watch import GradWatch
from bprun.engine import Trainer, TrainerSettings
from bprun.engine.settings import GradWatch as GradWatchSettings
from bprun.errors import BprunError
from bprun.tasks.lr_find import rerun_command

CONF = Path(__file__).resolve().parents[1] / "conf"
DEEP = "model.hidden=[" + ",".join(["64"] * 20) + "]"
# Until conf/model/mlp.yaml lists `init`, the key is added on the command line.
INIT = "model.init" if "init:" in (CONF / "model" / "mlp.yaml").read_text() else "+model.init"
IMAGE_ONLY = {"resnet"}  # every other model in the zoo also reads MNIST-1D sequences


class Capture:
    """A stand-in for bprun.tracking.Tracker that keeps what is logged."""

    writer = None

    def __init__(self):
        self.scalars: dict[str, list[tuple[int, float]]] = {}
        self.texts: list[str] = []

    def log(self, scalars, step):
        for k, v in scalars.items():
            self.scalars.setdefault(k, []).append((step, v))

    def text(self, tag, text, step=0):
        self.texts.append(text)


def assert_real_png(path: Path) -> None:
    """A PNG file that matplotlib drew something into: signature, size, and varied pixels."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > 10_000, f"{path} is only {len(data)} bytes"
    rgb = mpimg.imread(path)[..., :3]
    assert rgb.shape[0] >= 300 and rgb.shape[1] >= 400
    dark = (rgb.mean(-1) < 0.5).mean()  # axes, text, bars, lines
    assert 0.005 < dark < 0.9, f"{path}: {dark:.4f} of the pixels are dark"
    assert len({tuple(p) for p in rgb.reshape(-1, 3)[::7].round(2).tolist()}) > 20


def problem(n=64, d=5, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 1).long()


def trainer_for(model, settings: TrainerSettings, optimizer=None, run_dir=None, loss=None):
    trainer = Trainer(
        settings,
        model,
        loss or nn.CrossEntropyLoss(),
        optimizer or torch.optim.SGD(model.parameters(), lr=0.1),
        num_classes=3,
        callbacks=diagnostic_callbacks(settings, run_dir),
        tracker=Capture(),
    )
    return trainer


# ---------------------------------------------------------------------- switching on and off
def test_instruments_off_add_no_callbacks():
    assert diagnostic_callbacks(TrainerSettings(), None) == []


@pytest.mark.parametrize(
    ("settings", "kind"),
    [
        ({"log_grad_norms": True}, GradientMonitor),
        ({"grad_flow_every_n_epochs": 2}, GradientMonitor),
        ({"grad_watch": GradWatchSettings(vanish_below=1e-6)}, GradientMonitor),
        ({"grad_watch": GradWatchSettings(explode_above=1e3)}, GradientMonitor),
        ({"dead_units": True}, DeadUnits),
        ({"detect_anomaly": True}, AnomalyLocator),
    ],
)
def test_each_instrument_adds_one_callback(settings, kind):
    callbacks = diagnostic_callbacks(TrainerSettings(**settings), None)
    assert [type(c) for c in callbacks] == [kind]


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"grad_watch": GradWatchSettings(vanish_below=1e-4, patience=0)}, "patience"),
        ({"grad_watch": GradWatchSettings(vanish_below=-1.0)}, "vanish_below"),
        ({"grad_watch": GradWatchSettings(vanish_below=10, explode_above=1)}, "explode_above"),
        ({"grad_flow_every_n_epochs": 0}, "grad_flow_every_n_epochs"),
    ],
)
def test_impossible_instrument_settings_are_named(settings, named):
    with pytest.raises(BprunError, match=named):
        diagnostic_callbacks(TrainerSettings(**settings), None)


# ---------------------------------------------------------------------- gradient flow
def test_grad_norms_and_update_ratios_are_those_of_the_update():
    x, y = problem()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    start = copy.deepcopy(model)
    s = TrainerSettings(max_updates=1, log_every_n_updates=1, log_grad_norms=True, progress=False)
    trainer = trainer_for(model, s)
    trainer.fit(InMemoryLoader(x, y, 16), None)

    nn.CrossEntropyLoss()(start(x[:16]), y[:16]).backward()
    logged = trainer.tracker.scalars
    for name, p in start.named_parameters():
        ((step, norm),) = logged[f"grad_norm/{name}"]
        assert step == 1
        assert norm == pytest.approx(p.grad.norm().item(), rel=1e-5)
        if p.dim() >= 2:  # plain SGD: ||dW|| = lr ||g||
            ((_, ratio),) = logged[f"update_ratio/{name}"]
            assert ratio == pytest.approx(0.1 * p.grad.norm().item() / p.norm().item(), rel=1e-4)
        else:
            assert f"update_ratio/{name}" not in logged


def test_norms_are_logged_at_log_intervals_only():
    x, y = problem(n=160)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    s = TrainerSettings(max_epochs=2, log_every_n_updates=3, log_grad_norms=True, progress=False)
    trainer = trainer_for(model, s)
    trainer.fit(InMemoryLoader(x, y, 16), None)  # 10 updates per epoch
    steps = [step for step, _ in trainer.tracker.scalars["grad_norm/0.weight"]]
    assert steps == [3, 6, 9, 12, 15, 18]


def test_grad_flow_chart_every_n_epochs(tmp_path):
    x, y = problem(n=64)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 3)
    )
    s = TrainerSettings(max_epochs=4, grad_flow_every_n_epochs=2, progress=False)
    trainer_for(model, s, run_dir=tmp_path).fit(InMemoryLoader(x, y, 16), None)
    charts = sorted(p.name for p in (tmp_path / "grad_flow").iterdir())
    assert charts == ["epoch_002.png", "epoch_004.png"]
    assert_real_png(tmp_path / "grad_flow" / "epoch_004.png")


# ---------------------------------------------------------------------- vanishing / exploding
def test_watch_fires_once_per_episode_and_rearms_after_recovery():
    watch = GradWatch(["a", "b"], 1e-3, 10.0, patience=3, device=torch.device("cpu"))
    nan = math.nan
    norms = {1: (1e-4, 1), 2: (1e-4, nan), 3: (1e-5, nan), 4: (1e-6, nan), 5: (1e-6, 1)}
    for u, pair in norms.items():
        watch.step(torch.tensor(pair), u)
    events, active = watch.read(watch.state().tolist(), 5)
    assert [(e["kind"], e["layer"], e["update"]) for e in events] == [
        ("vanishing", "a", 3),
        ("exploding", "b", 4),
    ]
    assert events[0]["norm"] == pytest.approx(1e-5)
    assert active == {"vanishing": 1, "exploding": 0}
    # Still vanishing: the same episode, no new event. Then a recovery, and a new episode.
    for u, pair in {6: (1e-6, 1), 7: (1.0, 1), 8: (1e-4, 1), 9: (1e-4, 1)}.items():
        watch.step(torch.tensor(pair), u)
    assert watch.read(watch.state().tolist(), 9)[0] == []
    watch.step(torch.tensor((1e-4, 1)), 10)
    events, _ = watch.read(watch.state().tolist(), 10)
    assert [(e["layer"], e["update"]) for e in events] == [("a", 10)]


class ReluRNN(nn.Module):
    """A vanilla ReLU RNN whose recurrent matrix is 2 x orthogonal: states and gradients grow
    geometrically over the 40 steps."""

    def __init__(self, steps=40, hidden=32, classes=3):
        super().__init__()
        self.rnn = nn.RNN(1, hidden, nonlinearity="relu", batch_first=True)
        self.head = nn.Linear(hidden, classes)
        with torch.no_grad():
            nn.init.orthogonal_(self.rnn.weight_hh_l0)
            self.rnn.weight_hh_l0.mul_(2.0)
            self.rnn.weight_ih_l0.abs_()

    def forward(self, x):
        out, _ = self.rnn(x.unsqueeze(-1))
        return self.head(out[:, -1])


def test_rnn_with_large_recurrent_init_trips_the_exploding_warning(caplog):
    torch.manual_seed(0)
    x = torch.rand(64, 40)
    y = torch.randint(0, 3, (64,))
    s = TrainerSettings(
        max_updates=8,
        log_every_n_updates=4,
        grad_watch=GradWatchSettings(explode_above=1e3, patience=3),
        progress=False,
    )
    model = ReluRNN()
    trainer = trainer_for(model, s, torch.optim.SGD(model.parameters(), lr=1e-12))
    with caplog.at_level("WARNING", logger="bprun"):
        trainer.fit(InMemoryLoader(x, y, 16), None)
    events = trainer.summarize({})["grad_watch_events"]
    assert {"rnn.weight_ih_l0", "rnn.weight_hh_l0"} <= {e["layer"] for e in events}
    assert {e["update"] for e in events} == {3} and all(e["kind"] == "exploding" for e in events)
    assert all(e["norm"] > 1e5 for e in events)
    (line,) = [r.getMessage() for r in caplog.records if "exploding" in r.getMessage()]
    assert "trainer.grad_watch.explode_above=1000 for 3 consecutive updates, at update 3:" in line
    assert _norm(line, "rnn.weight_hh_l0") == pytest.approx(
        next(e["norm"] for e in events if e["layer"] == "rnn.weight_hh_l0"), rel=1e-2
    )
    assert [h["grad_watch/exploding_events"] for h in trainer.history] == [len(events), 0]


# ---------------------------------------------------------------------- dead units
def test_dead_unit_fraction_per_relu_layer():
    x, y = problem(n=64)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 10), nn.ReLU(), nn.Linear(10, 10), nn.LeakyReLU(), nn.Linear(10, 3)
    )
    with torch.no_grad():
        model[0].bias[:4] = -100.0  # 4 of 10 units can never fire
        model[2].bias.fill_(-100.0)  # all dead
    s = TrainerSettings(max_updates=2, log_every_n_updates=2, dead_units=True, progress=False)
    trainer = trainer_for(model, s, torch.optim.SGD(model.parameters(), lr=1e-9))
    trainer.fit(InMemoryLoader(x, y, 32), None)
    assert trainer.tracker.scalars["dead_units/1"] == [(2, pytest.approx(0.4))]
    assert trainer.tracker.scalars["dead_units/3"] == [(2, pytest.approx(1.0))]
    assert all(not m._forward_hooks for m in model.modules())  # hooks gone after the batch


# ---------------------------------------------------------------------- anomaly location
class LogNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return torch.log(self.fc(x))  # negative logits: NaN in the forward pass


def test_detect_anomaly_names_the_layer_of_a_forward_nan():
    x, y = problem()
    trainer = trainer_for(LogNet(), TrainerSettings(max_updates=2, detect_anomaly=True))
    model = trainer.module
    with pytest.raises(BprunError, match=r"^update 1: the forward of model LogNet turned finite"):
        trainer.fit(InMemoryLoader(x, y, 16), None)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------------- gradient check
def zoo() -> list[tuple[str, str]]:
    """bprun's own model families (torchvision's and timm's backward are theirs to check)."""
    library = {"torchvision", "timm"}
    names = sorted(p.stem for p in (CONF / "model").glob("*.yaml") if p.stem not in library)
    return [
        (
            n,
            "text"
            if n in TEXT
            else RECOMMENDERS.get(n, "digits" if n in IMAGE_ONLY else "mnist1d"),
        )
        for n in names
    ]


RECOMMENDERS = {"mf": "interactions_demo", "ncf": "interactions_demo"}  # users and items
# Models that read token ids: a small GPT on the embedded text corpus.
TEXT = {
    "gpt": ["dataset=text", "dataset.block_size=16", "model.n_layer=1", "model.n_head=2",
            "model.n_embd=16", "model.dropout=0.0"],
}  # fmt: skip


@pytest.fixture(scope="module")
def compose_cfg():
    register_configs()
    with initialize_config_module("bprun.conf", version_base="1.3"):
        yield lambda *overrides: compose("config", overrides=list(overrides))


@pytest.mark.slow
@pytest.mark.parametrize(("model", "dataset"), zoo())
def test_gradcheck_passes_on_every_model_in_the_zoo(model, dataset, compose_cfg, data_dir):
    extra = TEXT.get(model, [f"dataset={dataset}"])
    cfg = compose_cfg(f"model={model}", *extra, f"paths.data_dir={data_dir}")
    data = build_data(cfg.dataset, torch.device("cpu"), 0)
    torch.manual_seed(0)
    problem = build_problem(None, data.dataset)
    net = build_model(cfg.model, data.dataset, problem)
    x, y = next(data.train.batches(0))
    big = model in IMAGE_ONLY  # resnet18: 11M parameters, 62 tensors
    s = GradcheckSettings(batch_size=2 if big else 4, max_coords=2 if big else 8)
    loss = problem.criterion(build_loss(cfg.loss, problem))
    results = check_gradients(net, loss, x[: s.batch_size], y[: s.batch_size], s)
    assert {r.name for r in results} == {n for n, p in net.named_parameters() if p.requires_grad}
    worst = max(results, key=lambda r: r.max_rel_error)
    assert all(r.passed for r in results), worst
    assert worst.max_rel_error < 1e-4
    assert sum(r.checked - r.kinks for r in results) >= len(results)
    assert next(net.parameters()).dtype == torch.float32  # the check works on a float64 copy


BAD_MODEL = '''
import math
import torch
from torch import nn


class WrongSquare(torch.autograd.Function):
    """x * x with the derivative 3x instead of 2x."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x * grad


class BadGradNet(nn.Module):
    def __init__(self, input_shape, num_classes, dropout=0.5):
        super().__init__()
        self.fc = nn.Linear(math.prod(input_shape), 8)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        h = torch.tanh(self.fc(x.flatten(1)))
        return self.head(self.drop(WrongSquare.apply(self.gain) * h))
'''


def user_model(tmp_path: Path, name: str, source: str, target: str) -> str:
    """A model class in the working directory and a conf/model/<name>.yaml on the searchpath."""
    (tmp_path / f"{name}.py").write_text(source)
    conf = tmp_path / "conf" / "model"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / f"{name}.yaml").write_text(f"_target_: {name}.{target}\n")
    return f"hydra.searchpath=[file://{tmp_path / 'conf'}]"


def test_gradcheck_cli_fails_on_a_wrong_backward_naming_the_parameter(bprun, tmp_path):
    searchpath = user_model(tmp_path, "badgrad", BAD_MODEL, "BadGradNet")
    r = bprun("task=gradcheck", "model=badgrad", searchpath, check=False)
    assert r.returncode == 1
    error = r.stdout.strip().splitlines()[-1]
    assert error.startswith("error: gradient check failed for gain (")
    assert "fc.weight" not in error and "head" not in error
    assert "Traceback" not in r.output
    report = json.loads((r.run_dir / "gradcheck.json").read_text())
    assert report["passed"] is False
    rows = {p["name"]: p for p in report["parameters"]}
    assert [n for n, p in rows.items() if not p["passed"]] == ["gain"]
    assert rows["gain"]["autograd_gradcheck"] is False
    assert rows["gain"]["checked"] == 8 and rows["fc.weight"]["checked"] == 40 * 8
    worst = rows["gain"]["worst"]  # 3x against 2x: off by a half of the true derivative
    assert worst["autograd"] / worst["numerical"] == pytest.approx(1.5, rel=1e-4)
    assert all(rows[n]["max_rel_error"] < 1e-6 for n in ("fc.weight", "fc.bias", "head.bias"))


def test_gradcheck_cli_passes_on_the_default_model(bprun):
    r = bprun("task=gradcheck", "model=logreg")
    assert "gradient check passed: max relative error" in r.output
    assert re.search(r"head\.weight\s+10x40\s+400\s+\S+\s+0\s+passed\s+ok", r.output)
    report = json.loads((r.run_dir / "gradcheck.json").read_text())
    assert report["passed"] is True
    assert max(p["max_rel_error"] for p in report["parameters"]) < 1e-5


# ---------------------------------------------------------------------- learning-rate finder
def test_schedule_and_suggestion_follow_lightning():
    s = LrFindSettings(min_lr=1e-6, max_lr=1.0, num_steps=4)
    sweep = _Sweep(s, None)
    # Lightning's _ExponentialLR: base lr first, then base * (max/base) ** ((k + 1) / n).
    assert [sweep.lr(k) for k in range(4)] == pytest.approx([1e-6, 1e-3, 10**-1.5, 1.0])
    lrs = [10.0**e for e in range(-8, 1)]
    losses = [5.0, 5.0, 4.9, 4.0, 3.9, 3.0, 2.0, 2.5, 9.0]
    # np.gradient from index 2 on: steepest at index 5 ((2.0 - 3.9) / 2)
    assert suggest(lrs, losses, skip_begin=2, skip_end=1) == (1e-3, 5)
    assert suggest(lrs[:3], losses[:3], skip_begin=2, skip_end=1) == (None, None)


def test_rerun_command_keeps_the_users_overrides():
    command = rerun_command(
        [
            "task=lr_find",
            "model=cnn",
            "optim.lr=0.1",
            "lr_find.num_steps=50",
            "model.channels=[8,16]",
        ],
        0.00314159,
    )
    assert command == "bprun model=cnn 'model.channels=[8,16]' optim.lr=0.00314"


def test_find_lr_leaves_the_model_and_optimizer_as_they_were():
    x, y = problem(n=256)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    trainer = trainer_for(model, TrainerSettings(progress=False), optimizer)
    before = copy.deepcopy(model.state_dict())
    rng = torch.random.get_rng_state()
    result = find_lr(trainer, InMemoryLoader(x, y, 32, shuffle=True), LrFindSettings(num_steps=30))
    assert len(result.lrs) == 30 and result.suggestion in result.lrs
    assert result.lrs[0] == 1e-8 and result.lrs[-1] == pytest.approx(1.0)
    # it did train: at the high learning rates the loss falls clearly below its plateau
    # (without optimizer steps it stays within 1% of it)
    assert min(result.losses[-8:]) < 0.95 * max(result.losses)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert optimizer.state == {} and optimizer.param_groups[0]["lr"] == 1e-3
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert trainer.update == 0 and trainer.history == []


def test_find_lr_takes_a_loss_function_too():
    x, y = problem(n=256)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    loss = nn.functional.cross_entropy
    trainer = trainer_for(model, TrainerSettings(progress=False), loss=loss)
    result = find_lr(trainer, InMemoryLoader(x, y, 32), LrFindSettings(num_steps=12, skip_begin=2))
    assert len(result.lrs) == 12 and all(math.isfinite(v) for v in result.losses)
    assert trainer.loss_fn is loss


def test_find_lr_trains_on_the_batches_the_training_would_see():
    """The trainer's batch hooks (Mixup, CutMix, adversarial examples) apply in the range test."""
    x, y = problem(n=256)
    seen = []

    def loss(output, target):
        seen.append(target)
        return nn.functional.cross_entropy(output, target)

    class FirstClassOnly:  # stands for a batch hook such as Mixup
        def on_train_batch(self, trainer, xb, yb):
            return xb, torch.zeros_like(yb)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer(
        TrainerSettings(progress=False), model, loss, opt, callbacks=[FirstClassOnly()]
    )
    find_lr(trainer, InMemoryLoader(x, y, 32, shuffle=True), LrFindSettings(num_steps=10))
    assert len(seen) == 10 and all(bool((t == 0).all()) for t in seen)


def test_lr_find_cli_suggests_near_the_shipped_lr_and_writes_no_weights(bprun):
    r = bprun("task=lr_find")
    shipped = float(re.search(r"^lr: (\S+)", (CONF / "optim" / "adam.yaml").read_text(), re.M)[1])
    suggestion = float(re.search(r"suggested learning rate: (\S+)", r.output)[1])
    assert shipped / 10 <= suggestion <= shipped * 10, (suggestion, shipped)
    assert re.search(rf"^\s+bprun .*optim\.lr={suggestion:.3g}$", r.output, re.M)
    found = json.loads((r.run_dir / "lr_find.json").read_text())
    assert found["suggestion"] == pytest.approx(suggestion, rel=1e-2)
    assert len(found["lrs"]) == len(found["losses"]) == 100
    assert_real_png(r.run_dir / "lr_find.png")
    assert not list(r.run_dir.rglob("*.pt")) and not (r.run_dir / "checkpoints").exists()
    assert not (r.run_dir / "metrics.json").exists()


# ---------------------------------------------------------------------- end to end
def _norm(output: str, layer: str) -> float:
    return float(re.search(rf"{re.escape(layer)} (\S+?)[,;\n]", output + "\n")[1])


@pytest.mark.slow
def test_deep_sigmoid_mlp_trips_the_vanishing_warning(bprun):
    r = bprun(
        "model=mlp", DEEP, "model.activation=sigmoid", "model.norm=none",
        "trainer.grad_watch.vanish_below=1e-4", "trainer.grad_flow_every_n_epochs=1",
        "trainer.max_epochs=1", "trainer.limit_train_batches=10",
    )  # fmt: skip
    (line,) = [ln for ln in r.output.splitlines() if "vanishing gradients in" in ln]
    assert "trainer.grad_watch.vanish_below=0.0001 for 5 consecutive updates, at update 5:" in line
    assert _norm(line, "blocks.0.0.weight") < 1e-10 < _norm(line, "blocks.10.0.weight") < 1e-4
    assert "blocks.19.0.weight" not in line and "head.weight" not in line
    n_layers = int(re.search(r"in (\d+) layer", line)[1])
    assert 10 <= n_layers <= 19
    assert r.metrics["history"][0]["grad_watch/vanishing_events"] == n_layers
    events = r.metrics["grad_watch_events"]
    assert len(events) == n_layers and {e["kind"] for e in events} == {"vanishing"}
    assert {e["update"] for e in events} == {5} and events[0]["layer"] == "blocks.0.0.weight"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(r.run_dir), size_guidance={"scalars": 0, "tensors": 0})
    tb.Reload()
    assert max(e.value for e in tb.Scalars("grad_watch/vanishing_layers")) == n_layers
    assert "grad_watch/text_summary" in tb.Tags()["tensors"]  # the warning as text
    assert_real_png(r.run_dir / "grad_flow" / "epoch_001.png")


@pytest.mark.slow
def test_deep_relu_mlp_with_he_init_and_batch_norm_does_not(bprun):
    r = bprun(
        "model=mlp", DEEP, "model.activation=relu", "model.norm=batch", f"{INIT}=kaiming_normal",
        "trainer.grad_watch.vanish_below=1e-4", "trainer.grad_flow_every_n_epochs=1",
        "trainer.log_grad_norms=true", "trainer.log_every_n_updates=5",
        "trainer.max_epochs=1", "trainer.limit_train_batches=10",
    )  # fmt: skip
    assert "vanishing gradients" not in r.output
    assert r.metrics["history"][0]["grad_watch/vanishing_events"] == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(r.run_dir), size_guidance={"scalars": 0})
    events.Reload()
    first = [e.value for e in events.Scalars("grad_norm/blocks.0.0.weight")]
    assert len(first) == 2 and min(first) > 1e-2
    assert_real_png(r.run_dir / "grad_flow" / "epoch_001.png")


BIG_GRU = """
import torch
from bprun.models import GRU


class BigGRU(GRU):
    def __init__(self, input_shape, num_classes, recurrent_scale=20.0, **kwargs):
        super().__init__(input_shape, num_classes, **kwargs)
        with torch.no_grad():
            self.rnn.weight_hh_l0.mul_(recurrent_scale)
"""


@pytest.mark.slow
def test_gru_with_large_recurrent_init_trips_the_exploding_warning(bprun, tmp_path):
    searchpath = user_model(tmp_path, "big_gru", BIG_GRU, "BigGRU")
    r = bprun(
        "model=big_gru", searchpath, "trainer.grad_watch.explode_above=1e3",
        "trainer.grad_watch.patience=3", "trainer.max_epochs=1", "trainer.limit_train_batches=6",
    )  # fmt: skip
    (line,) = [ln for ln in r.output.splitlines() if "exploding gradients in" in ln]
    assert "trainer.grad_watch.explode_above=1000 for 3 consecutive updates, at update 3:" in line
    assert _norm(line, "rnn.weight_hh_l0") > 1e3 and "head.weight" not in line
    assert r.metrics["history"][0]["grad_watch/exploding_events"] >= 1


ROOT_MODEL = """
import math
import torch
from torch import nn


class Root(nn.Module):
    def forward(self, x):
        return torch.where(x > 0, torch.sqrt(x), torch.zeros_like(x))


class RootNet(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.fc = nn.Linear(math.prod(input_shape), 16)
        self.root = Root()
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.root(self.fc(x.flatten(1))))
"""


def test_detect_anomaly_ends_with_the_op_and_the_layer(bprun, tmp_path):
    searchpath = user_model(tmp_path, "rootnet", ROOT_MODEL, "RootNet")
    r = bprun("model=rootnet", searchpath, "trainer.detect_anomaly=true", "trainer.max_updates=2",
              check=False)  # fmt: skip
    assert r.returncode == 1
    last = r.stdout.strip().splitlines()[-1]  # stderr holds torch's "anomaly mode on" warning
    assert last.startswith(
        "error: update 1: SqrtBackward0 in layer 'root' (Root) produced nan gradients"
    ), last
    assert "(forward: rootnet.py:9 in forward)" in last
    assert "Traceback" not in r.output and "Error detected in" not in r.output
    assert r.metrics["status"] == "failed" and "SqrtBackward0" in r.metrics["error"]
