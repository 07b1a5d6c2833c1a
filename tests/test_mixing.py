"""Mixup and CutMix (dataset.augment.mixup / cutmix): soft labels, where their draws come
from, the loss against them, training with them, exact resume, and the refusals."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest
import torch
from test_checkpoint import saved_update, start, wait_for_update
from torch import nn

from bprun.data.augment import parse_augment
from bprun.data.mixing import MixBatches, mixing_callbacks
from bprun.engine import checkpoint as ckpt_io
from bprun.errors import BprunError
from bprun.losses import CrossEntropyLoss, NLLLoss
from bprun.problems.classification import Classification


def batch(n=32, classes=10):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_mixup_blends_each_image_with_its_neighbour_and_its_label_alike():
    x, y = batch()
    torch.manual_seed(0)
    mixed, soft = MixBatches(0.4, 0.0, 10).on_train_batch(None, x, y)
    assert soft.shape == (32, 10) and soft.dtype == torch.float32
    torch.testing.assert_close(soft.sum(1), torch.ones(32))
    # the weight of each image's own label is the weight of the image itself
    lam = soft[0, y[0]] if y[0] != y[-1] else None
    assert lam is not None and 0 < lam < 1
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.roll(1, 0))
    others = torch.ones_like(soft, dtype=torch.bool)
    others[torch.arange(32), y] = False
    others[torch.arange(32), y.roll(1, 0)] = False
    assert (soft[others] == 0).all()  # only the two images' classes carry weight


def test_cutmix_pastes_a_box_of_the_neighbour_with_labels_weighted_by_its_area():
    x, y = batch()
    torch.manual_seed(1)
    mixed, soft = MixBatches(0.0, 1.0, 10).on_train_batch(None, x, y)
    torch.testing.assert_close(soft.sum(1), torch.ones(32))
    from_neighbour = (mixed == x.roll(1, 0)) & (mixed != x)
    assert from_neighbour.any() and ((mixed == x) | (mixed == x.roll(1, 0))).all()
    area = from_neighbour[0].float().mean()  # pasted pixels (all differ: random floats)
    if y[0] != y[-1]:
        torch.testing.assert_close(soft[0, y[-1]], area)


def test_the_draws_come_from_the_global_cpu_generator_that_checkpoints_hold():
    x, y = batch()
    mix = MixBatches(0.4, 1.0, 10)  # both: a random choice per batch, as timm does
    torch.manual_seed(7)
    saved = ckpt_io.rng_state()
    first = [mix.on_train_batch(None, x, y) for _ in range(6)]
    assert not torch.equal(saved["torch"], torch.get_rng_state())  # the draws moved it
    ckpt_io.set_rng_state(saved)  # what a resume does
    again = [mix.on_train_batch(None, x, y) for _ in range(6)]
    for (a, sa), (b, sb) in zip(first, again, strict=True):
        assert torch.equal(a, b) and torch.equal(sa, sb)
    boxes = [bool(((m == x) | (m == x.roll(1, 0))).all()) for m, _ in first]
    assert any(boxes) and not all(boxes)  # both CutMix and MixUp batches occurred


def test_soft_target_cross_entropy_is_finite_and_accuracy_counts_the_argmax():
    torch.manual_seed(0)
    out = torch.randn(8, 10)
    soft = torch.softmax(torch.randn(8, 10) * 3, 1)
    loss = CrossEntropyLoss()(out, soft)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, -(soft * out.log_softmax(1)).sum(1).mean())
    with pytest.raises(BprunError, match="loss=cross_entropy needs class labels"):
        CrossEntropyLoss()(out, torch.rand(8, 3))  # float targets of another shape
    m = Classification(10).evaluation("cpu")
    m.update(loss, out, soft)
    hits = (out.argmax(1) == soft.argmax(1)).float().mean()
    assert m.compute("train")["train/acc"] == pytest.approx(float(hits))


class TargetRecorder(nn.Module):
    """The run's loss, noting the targets of each call (training, then evaluation)."""

    def __init__(self, loss):
        super().__init__()
        self.loss, self.targets = loss, []

    def forward(self, out, y):
        self.targets.append(y)
        return self.loss(out, y)


def test_training_batches_get_soft_targets_and_evaluation_batches_do_not(tmp_path):
    from test_adversarial import build

    args = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "dataset.augment.mixup=0.4"]
    trainer, data = build(tmp_path, *args)
    trainer.loss_fn = TargetRecorder(trainer.loss_fn)
    trainer.fit(data.train, None)
    trained = trainer.loss_fn.targets
    assert len(trained) == 3
    for y in trained:
        assert y.shape == (64, 10) and y.is_floating_point()
        torch.testing.assert_close(y.sum(1), torch.ones(64))
        assert (y.max(1).values < 1).any()  # mixed, not one-hot
    trainer.loss_fn.targets.clear()
    trainer.evaluate(data.test, "test")
    assert all(y.dtype == torch.int64 and y.dim() == 1 for y in trainer.loss_fn.targets)


def dataset(problem="classification", shape=(1, 8, 8)):
    return SimpleNamespace(problem=problem, input_shape=shape, num_classes=10)


@pytest.mark.parametrize(
    "data, loss, message",
    [
        (dataset("regression"), nn.MSELoss(), "mix class labels, but this dataset poses a regr"),
        (dataset(shape=(1, 40)), CrossEntropyLoss(), r"mix images \(N, C, H, W\), but this dat"),
        (dataset(), NLLLoss(), "make soft targets .* which NLLLoss cannot take: use loss=cross"),
    ],
)
def test_mixing_what_cannot_be_mixed_is_a_one_line_error(data, loss, message):
    with pytest.raises(BprunError, match=message):
        mixing_callbacks({"mixup": 0.2, "cutmix": 0.0}, data, loss)
    assert mixing_callbacks({"mixup": 0.0, "cutmix": 0.0}, data, loss) == []  # off: no hook


@pytest.mark.parametrize("value", [-0.2, True, "x"])
def test_a_bad_alpha_is_a_one_line_error(value):
    with pytest.raises(BprunError, match="dataset.augment.cutmix is the alpha of its Beta"):
        parse_augment({"cutmix": value}, torch.zeros(2, 1, 8, 8))


def test_mixup_with_a_loss_that_takes_no_probabilities_fails_in_one_line(bprun):
    r = bprun("dataset=digits", "dataset.augment.mixup=0.2", "loss=nll", check=False)
    assert r.returncode != 0 and "Traceback" not in r.output
    assert "dataset.augment.mixup make soft targets (class probabilities), which NLLLoss" in (
        r.output
    )


@pytest.mark.slow
def test_a_mixed_digits_run_trains_and_resumes_exactly_after_sigkill(bprun, data_dir, tmp_path):
    args = [
        "dataset=digits",
        "model=mlp",
        "model.hidden=[64]",
        "optim.lr=0.01",
        "trainer.max_epochs=1",
        "dataset.augment.mixup=0.4",
        "dataset.augment.cutmix=1.0",
        "trainer.checkpoint.every_n_updates=1",
    ]
    reference = bprun(*args, f"hydra.run.dir={tmp_path}/ref")
    assert reference.metrics["test"]["test/acc"] > 0.6  # chance is 0.1
    total = reference.metrics["updates"]
    run_dir = tmp_path / "killed"
    proc = start(args, data_dir, run_dir)
    wait_for_update(proc, run_dir / "checkpoints" / "last.pt", total // 2 + 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert saved_update(run_dir / "checkpoints" / "last.pt") < total
    resumed = bprun(f"trainer.resume={run_dir}")
    want = torch.load(reference.run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    got = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    assert resumed.metrics["test"] == reference.metrics["test"]
