"""Adversarial examples (FGSM, PGD): the perturbation's limits, its effect on a trained CNN,
adversarial training's effect, exact resume, and the errors of bad settings."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_module
from torch import nn

from bprun.config import register_configs
from bprun.data import InMemoryLoader
from bprun.data.augment import make_transforms, pixel_bounds
from bprun.engine import Trainer, TrainerSettings
from bprun.engine.adversarial import adversarial_callbacks, attacked, perturb
from bprun.engine.settings import Adversarial, Attack
from bprun.errors import BprunError
from bprun.tasks.setup import build_trainer, input_bounds, trainer_settings

MEAN, STD = (0.5, 0.25, 0.4), (0.2, 0.3, 0.25)


def small_cnn(channels=3, classes=4):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, classes),
    )


def uint8_batch(n=16):
    """Normalised images as the loaders make them from uint8 pixels, with their bounds."""
    g = torch.Generator().manual_seed(1)
    raw = torch.randint(0, 256, (n, 3, 6, 6), generator=g, dtype=torch.uint8)
    raw[:, :, 0, :] = 0  # pixels at the ends of the range: the clamp has work to do
    raw[:, :, 1, :] = 255
    _, to_float = make_transforms(raw, MEAN, STD, None, torch.device("cpu"))
    y = torch.randint(0, 4, (n,), generator=g)
    return to_float(raw), y, pixel_bounds(raw, MEAN, STD, None, torch.device("cpu"))


def to_pixels(x):
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return x * std + mean


@pytest.mark.parametrize("method", ["fgsm", "pgd"])
def test_perturbation_stays_within_eps_in_pixel_units_and_within_the_pixel_range(method):
    x, y, bounds = uint8_batch()
    model = small_cnn()
    eps = 8 / 255
    adv = perturb(model, nn.CrossEntropyLoss(), x, y, Attack(method, eps, steps=5), bounds)
    pixels, clean = to_pixels(adv), to_pixels(x)
    change = (pixels - clean).abs()
    assert change.max() <= eps + 1e-5  # L-infinity ball of 8/255 in pixel space, each channel
    assert change.max() >= eps - 1e-5  # and the attack uses it
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    # at pixels 0 and 255 the step that would leave the range was clamped away
    assert (pixels[:, :, 0] > 0).any() and (pixels[:, :, 0] < 1e-5).any()
    assert (pixels[:, :, 1] > 1 - 1e-5).any() and (pixels[:, :, 1] < 1).any()
    if method == "fgsm":  # one step of eps: every value with a gradient moved by eps or clamped
        inside = (clean > eps) & (clean < 1 - eps)
        moved = change[inside]
        assert ((moved - eps).abs() < 1e-5).float().mean() > 0.99


def test_inputs_without_a_range_are_not_clamped():
    torch.manual_seed(0)
    x, y = torch.randn(32, 6) * 3, torch.randint(0, 2, (32,))
    model = nn.Sequential(nn.Linear(6, 2))
    adv = perturb(model, nn.CrossEntropyLoss(), x, y, Attack("fgsm", 0.5))
    assert torch.allclose((adv - x).abs(), torch.full_like(x, 0.5))  # exact eps, no clamp


def test_the_attack_leaves_no_gradients_and_no_batch_norm_update_and_restores_the_mode():
    x, y, bounds = uint8_batch()
    model = small_cnn().train()
    stats = [t.clone() for t in model[1].buffers()]
    adv = perturb(model, nn.CrossEntropyLoss(), x, y, Attack("pgd", 0.1, steps=3), bounds)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model[1].buffers(), stats, strict=True))
    assert model.training and not adv.requires_grad
    # eval mode during the attack: without dropout, the same start gives the same examples
    torch.manual_seed(3)
    a = perturb(model, nn.CrossEntropyLoss(), x, y, Attack("pgd", 0.1, steps=3), bounds)
    torch.manual_seed(3)
    b = perturb(model, nn.CrossEntropyLoss(), x, y, Attack("pgd", 0.1, steps=3), bounds)
    assert torch.equal(a, b)


def test_pixel_bounds_follow_the_normalisation():
    raw = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    low, high, unit = pixel_bounds(raw, MEAN, STD, None, torch.device("cpu"))
    torch.testing.assert_close(low.flatten(), -torch.tensor(MEAN) / torch.tensor(STD))
    torch.testing.assert_close(high.flatten(), (1 - torch.tensor(MEAN)) / torch.tensor(STD))
    torch.testing.assert_close(unit.flatten(), 1 / torch.tensor(STD))
    low, high, unit = pixel_bounds(torch.zeros(2, 1, 8, 8), None, None, (0.0, 1.0), "cpu")
    assert (float(low), float(high), float(unit)) == (0.0, 1.0, 1.0)
    assert pixel_bounds(torch.zeros(2, 1, 40), None, None, None, "cpu") is None  # MNIST-1D


def fit(epochs, state=None, **adversarial):
    """A BatchNorm CNN under PGD training with random starts, or continued from `state`."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(48, 3, 6, 6, generator=g), torch.randint(0, 4, (48,), generator=g)
    s = TrainerSettings(max_epochs=epochs, progress=False, adversarial=Adversarial(**adversarial))
    model = small_cnn()
    cbs = adversarial_callbacks(s.adversarial, pixel_bounds(x, None, None, (0.0, 1.0), "cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer(s, model, nn.CrossEntropyLoss(), opt, num_classes=4, callbacks=cbs)
    if state is not None:
        trainer.load_state_dict(state)
    trainer.fit(InMemoryLoader(x, y, 16, shuffle=True), None)
    return trainer


def test_adversarial_training_resumes_exactly_and_changes_the_training():
    settings = {"method": "pgd", "eps": 0.1, "steps": 2, "share": 0.5}
    straight = fit(2, **settings)
    torch.manual_seed(123)  # whatever happens between the runs: the checkpoint's RNG state wins
    halfway = fit(1, **settings).state_dict()
    resumed = fit(2, state=halfway, **settings)
    want, got = straight.module.state_dict(), resumed.module.state_dict()
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    plain = fit(2, method="none")
    assert plain._on_train_batch == []  # off: no hook in the loop
    assert not torch.equal(plain.module[0].weight, straight.module[0].weight)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(method="fgsm", eps=-0.1), "trainer.adversarial.eps must be >= 0"),
        (dict(method="pgd", share=1.5), r"trainer.adversarial.share must lie in \[0, 1\]"),
        (dict(method="pgd", steps=0), "trainer.adversarial.steps must be at least 1"),
        (dict(method="pgd", alpha=0.0), "trainer.adversarial.alpha must be positive"),
        (dict(method="cw"), "trainer.adversarial.method='cw' is not known"),
    ],
)
def test_bad_adversarial_settings_are_one_line_errors(settings, message):
    with pytest.raises(BprunError, match=message):
        TrainerSettings(adversarial=Adversarial(**settings))


@pytest.mark.parametrize(
    "args, message",
    [
        (["task=eval", "ckpt=x.pt", "attack=pgd", "attack.eps=-1"], "attack.eps must be >= 0"),
        (["attack=pgd"], "attack=pgd attacks a trained model under task=eval ckpt=<run>; to tr"),
    ],
)
def test_bad_settings_on_the_command_line_end_in_one_line(args, message, bprun, tmp_path):
    (tmp_path / "x.pt").write_bytes(b"checked after the settings")
    r = bprun("dataset=digits", *args, check=False)
    assert r.returncode != 0 and "Traceback" not in r.output
    assert message in r.output


def build(tmp_path, *overrides):
    """(trainer, data) for a CNN on digits, built from the config as `bprun` builds them."""
    register_configs()
    with initialize_config_module("bprun.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*DIGITS_CNN, *overrides])
    return build_trainer(cfg, tmp_path, trainer_settings(cfg))


def digits_cnn(tmp_path, *overrides):
    """A CNN trained on digits in this process."""
    trainer, data = build(tmp_path, *overrides)
    trainer.fit(data.train, data.val)
    return trainer, data


DIGITS_CNN = [
    "dataset=digits",
    "model=cnn",
    "model.channels=[16,32]",
    "trainer.max_epochs=5",
    "trainer.threads=1",
    "trainer.progress=false",
    "trainer.checkpoint.enabled=false",
]
PGD = ["trainer.adversarial.method=pgd", "trainer.adversarial.eps=0.1"]


def test_fgsm_and_pgd_break_a_digits_cnn_and_pgd_training_resists_them(tmp_path):
    """eps = 0.1 of the pixel range: FGSM and then PGD lower a plain CNN's test accuracy
    clearly; a CNN trained on PGD examples (5 steps, half of each batch) keeps far more
    of it under the same PGD, and stays a good classifier of clean digits."""
    fgsm, pgd = Attack("fgsm", 0.1), Attack("pgd", 0.1, steps=10)
    results = {}
    robust_args = [
        *PGD,
        "trainer.adversarial.steps=5",
        "trainer.adversarial.share=0.5",
        "trainer.adversarial.validate_under_attack=true",  # val_pgd/* each epoch
        "trainer.monitor=val_pgd/acc",
        "trainer.mode=max",
    ]
    for name, extra in (("plain", []), ("robust", robust_args)):
        trainer, data = digits_cnn(tmp_path / name, *extra)
        bounds = input_bounds(data, trainer.device)
        results[name] = {
            "clean": trainer.evaluate(data.test, "test")["test/acc"],
            "fgsm": trainer.evaluate(data.test, "t", attacked(trainer, fgsm, bounds))["t/acc"],
            "pgd": trainer.evaluate(data.test, "t", attacked(trainer, pgd, bounds))["t/acc"],
        }
        if name == "robust":
            last = trainer.history[-1]
            assert last["val_pgd/acc"] < last["val/acc"] - 0.1 and "val_pgd/loss" in last
            assert trainer.best["val_pgd/acc"] == max(h["val_pgd/acc"] for h in trainer.history)
    plain, robust = results["plain"], results["robust"]
    assert plain["clean"] > 0.85 and robust["clean"] > 0.85
    assert plain["fgsm"] < plain["clean"] - 0.25
    assert plain["pgd"] < plain["fgsm"] - 0.05
    assert robust["pgd"] > plain["pgd"] + 0.15


@pytest.mark.slow
def test_eval_reports_accuracy_under_attack_beside_clean_accuracy(bprun, tmp_path):
    trained = bprun(*DIGITS_CNN[:3], "trainer.max_epochs=2", *PGD, "trainer.adversarial.steps=3")
    log = "adversarial training: pgd with eps=0.1 (pixel units), 3 step(s) of 0.08333"
    assert log in trained.stdout
    assert trained.metrics["adversarial"] == {
        "method": "pgd", "eps": 0.1, "alpha": 2.5 * 0.1 / 3, "steps": 3, "random_start": True,
        "share": 1.0,
    }  # fmt: skip
    bprun("task=eval", f"ckpt={trained.run_dir}", "attack=fgsm", "attack.eps=0.2")
    out = json.loads((trained.run_dir / "checkpoints" / "eval.json").read_text())
    assert out["attack"] == {
        "method": "fgsm", "eps": 0.2, "alpha": 0.2, "steps": 1, "random_start": False
    }  # fmt: skip
    assert out["test/acc"] == pytest.approx(trained.metrics["test"]["test/acc"])
    assert out["test_fgsm/acc"] < out["test/acc"] - 0.1
    assert out["test_fgsm/loss"] > out["test/loss"]
