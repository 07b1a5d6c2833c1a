"""Imbalanced classes: class weights, the focal loss, and the balanced sampler."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT
from omegaconf import OmegaConf
from torch import nn

from bprun.build import build_loss
from bprun.data.loader import InMemoryLoader
from bprun.data.sampler import BalancedSampler, SeededSampler
from bprun.data.stream import StreamLoader, TensorRows
from bprun.engine import Trainer, TrainerSettings
from bprun.errors import BprunError
from bprun.losses import FocalLoss
from bprun.problems.classification import Classification
from bprun.problems.regression import Regression

CPU = torch.device("cpu")


def imbalanced_labels(n: int = 200, seed: int = 0) -> torch.Tensor:
    """Three classes at about 80%, 15% and 5%."""
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed))
    return (u > 0.8).long() + (u > 0.95).long()


THREE = Classification(3)  # the problem the losses below score


def loss_node(name: str, **keys):
    node = OmegaConf.load(ROOT / "conf" / "loss" / f"{name}.yaml")
    node.update(keys)
    return node


def data_with(labels: torch.Tensor, num_classes: int):
    """What build_loss reads of the built data: the training labels and the class count."""
    return SimpleNamespace(train_labels=labels, dataset=SimpleNamespace(num_classes=num_classes))


def batch(n: int = 64, classes: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, classes, generator=g), torch.randint(0, classes, (n,), generator=g)


# ---------------------------------------------------------------- class weights


@pytest.mark.parametrize("name", ["auto", "cross_entropy", "nll", "bce_with_logits", "focal"])
def test_balanced_class_weights_are_scikit_learns(name):
    from sklearn.utils.class_weight import compute_class_weight

    y = imbalanced_labels()
    loss = build_loss(loss_node(name, class_weights="balanced"), THREE, data=data_with(y, 3))
    expected = compute_class_weight("balanced", classes=np.arange(3), y=y.numpy())
    buffers = dict(loss.named_buffers())
    weight = buffers.get("weight", buffers.get("class_weight"))
    assert torch.allclose(weight.double(), torch.from_numpy(expected), rtol=1e-6)
    # a registered buffer: it moves with the loss and is part of its state
    assert weight.dtype == torch.float32
    assert any(w is weight for w in loss.buffers())


def test_class_weights_weight_each_loss_as_torch_defines_them():
    out, y = batch()
    w = torch.tensor([0.5, 2.0, 4.0])
    data = data_with(y, 3)
    ce = build_loss(loss_node("cross_entropy", class_weights=w.tolist()), THREE, data=data)
    assert torch.allclose(ce(out, y), F.cross_entropy(out, y, weight=w))
    nll = build_loss(loss_node("nll", class_weights=w.tolist()), THREE, data=data)
    assert torch.allclose(nll(out, y), F.cross_entropy(out, y, weight=w))
    bce = build_loss(loss_node("bce_with_logits", class_weights=w.tolist()), THREE, data=data)
    onehot = F.one_hot(y, 3).float()
    per_row = F.binary_cross_entropy_with_logits(out, onehot, reduction="none") * w[y, None]
    assert torch.allclose(bce(out, y), per_row.mean())
    unweighted = build_loss(loss_node("cross_entropy"), THREE, data=data)
    assert not torch.allclose(unweighted(out, y), ce(out, y))


@pytest.mark.parametrize(
    "weights, message",
    [
        ([1.0, 2.0], "loss.class_weights has 2 weights, but the dataset has 3 classes"),
        ([1.0, -1.0, 1.0], "a list of non-negative numbers"),
        ("inverse", "must be balanced or a list"),
    ],
)
def test_bad_class_weights_are_one_line_errors(weights, message):
    with pytest.raises(BprunError, match=message):
        build_loss(
            loss_node("cross_entropy", class_weights=weights), THREE, data=data_with(batch()[1], 3)
        )


def test_class_weights_need_a_loss_that_weights_classes_and_every_class_present():
    y = torch.tensor([0, 0, 2, 2])
    with pytest.raises(BprunError, match=r"class\(es\) \[1\] have no training examples"):
        build_loss(
            loss_node("cross_entropy", class_weights="balanced"), THREE, data=data_with(y, 3)
        )
    with pytest.raises(BprunError, match="takes no per-class weight: use loss=cross_entropy"):
        build_loss(loss_node("mse", class_weights=[1.0]), Regression(1), data_with(y, 1))


def test_wrong_number_of_class_weights_end_to_end(bprun):
    r = bprun("dataset=digits", "loss.class_weights=[1,2,3]", check=False)
    assert r.returncode == 1 and "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: loss.class_weights has 3 weights, but the dataset has 10 classes: give one per "
        "class, in label order (or loss.class_weights=balanced)"
    ]
    assert not r.run_dir.exists()


# ---------------------------------------------------------------- focal loss


def focal_reference(out, y, gamma, alpha=None):
    """The focal loss written out example by example: -alpha_t (1 - p_t)^gamma log p_t."""
    total = norm = 0.0
    for logits, t in zip(out.tolist(), y.tolist(), strict=True):
        p = torch.tensor(logits).softmax(0)[t].item()
        a = 1.0 if alpha is None else alpha[t]
        total += -a * (1 - p) ** gamma * torch.log(torch.tensor(p)).item()
        norm += a
    return total / norm


@pytest.mark.parametrize("alpha", [None, [0.25, 1.0, 3.0]])
def test_focal_loss_is_cross_entropy_at_gamma_0_and_the_reference_formula(alpha):
    out, y = batch()
    w = None if alpha is None else torch.tensor(alpha)
    assert torch.allclose(FocalLoss(0.0, w)(out, y), F.cross_entropy(out, y, weight=w))
    for gamma in (0.5, 2.0, 5.0):
        got = FocalLoss(gamma, w)(out, y).item()
        assert got == pytest.approx(focal_reference(out, y, gamma, alpha), rel=1e-5)
    # confident right answers count less than under cross-entropy
    assert FocalLoss(2.0, w)(out, y) < F.cross_entropy(out, y, weight=w)


def test_focal_loss_config_soft_labels_and_bad_gamma():
    out, y = batch()
    loss = build_loss(loss_node("focal"), THREE, data=data_with(y, 3))
    assert isinstance(loss, FocalLoss) and loss.gamma == 2.0
    soft = F.one_hot(y, 3).float()  # one-hot soft labels: the same as the labels
    assert torch.allclose(loss(out, soft), loss(out, y))
    with pytest.raises(BprunError, match="loss.gamma must be >= 0"):
        build_loss(loss_node("focal", gamma=-1.0), THREE)
    with pytest.raises(BprunError, match="loss=focal needs class labels"):
        loss(out, torch.randn(64, 1))


# ---------------------------------------------------------------- the balanced sampler


def test_balanced_sampler_draws_every_class_equally_often():
    y = imbalanced_labels(300)
    s = BalancedSampler.for_labels(y, 32, seed=4)
    counts = torch.zeros(3)
    for epoch in range(40):
        order = s.order(epoch)
        assert len(order) == len(y) == s.num_samples  # an epoch is as long as before
        counts += torch.bincount(y[order], minlength=3)
    share = counts / counts.sum()
    assert torch.allclose(share, torch.full((3,), 1 / 3), atol=0.02), share
    assert torch.bincount(y, minlength=3)[2] / len(y) < 0.1  # the data itself is imbalanced
    # seeded by (seed, epoch) alone; other seeds and epochs draw otherwise
    again = BalancedSampler.for_labels(y, 32, seed=4)
    assert torch.equal(again.order(3), s.order(3))
    assert not torch.equal(s.order(3), s.order(4))
    assert not torch.equal(BalancedSampler.for_labels(y, 32, seed=5).order(3), s.order(3))


@pytest.mark.parametrize("world_size", [2, 3])
def test_balanced_sampler_shards_are_disjoint_positions_of_one_order(world_size):
    y = imbalanced_labels(103)
    per_rank = 4
    one = BalancedSampler.for_labels(y, per_rank * world_size, seed=2)
    ranks = [
        BalancedSampler.for_labels(y, per_rank, seed=2).sharded(r, world_size)
        for r in range(world_size)
    ]
    assert all(isinstance(r, BalancedSampler) for r in ranks)
    for epoch in (0, 1):
        whole = dict(one.batches(epoch))
        shares = [dict(r.batches(epoch)) for r in ranks]
        spans = sorted(p for r in ranks for b in whole for p in [r.bounds(b)] if p[0] < p[1])
        assert spans[0][0] == 0 and spans[-1][1] == len(y)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))  # disjoint
        for b, idx in whole.items():
            parts = [s[b][: r.batch_len(b)] for s, r in zip(shares, ranks, strict=True)]
            assert torch.equal(torch.cat(parts), idx)
    assert torch.equal(ranks[1].unsharded().order(1), one.order(1))


@pytest.mark.parametrize("path", ["memory", "stream"])
def test_balanced_training_resumes_mid_epoch_to_the_same_weights(path, tmp_path):
    """A run stopped after 5 updates of a 10-update epoch, saved, loaded and continued ends
    with the weights of one that never stopped, on either loader."""
    g = torch.Generator().manual_seed(0)
    y = imbalanced_labels(80)
    x = torch.randn(80, 6, generator=g) + y.unsqueeze(1).float()

    def loader():
        sampler = BalancedSampler.for_labels(y, 8, seed=3)
        if path == "memory":
            return InMemoryLoader(x, y, 8, sampler=sampler)
        return StreamLoader(TensorRows(x, y), sampler, CPU)

    class SaveAt:
        """A mid-epoch checkpoint, as trainer.checkpoint.every_n_updates writes one."""

        def __init__(self, update: int):
            self.update, self.saved = update, None

        def on_update_end(self, trainer):
            if trainer.update == self.update:
                self.saved = io.BytesIO()
                torch.save(trainer.state_dict(), self.saved)

    def trainer(*callbacks):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        s = TrainerSettings(progress=False, max_epochs=2)
        return Trainer(s, model, nn.CrossEntropyLoss(), opt, num_classes=3, callbacks=callbacks)

    checkpoint = SaveAt(5)  # 10 updates an epoch: halfway through the first
    straight = trainer(checkpoint)
    straight.fit(loader(), None)
    state = torch.load(io.BytesIO(checkpoint.saved.getvalue()), weights_only=True)
    assert (state["progress"]["epoch"], state["progress"]["batch"]) == (0, 5)
    torch.manual_seed(123)  # whatever happens in between: the checkpoint decides
    resumed = trainer()
    resumed.load_state_dict(state)
    resumed.fit(loader(), None)
    assert resumed.update == straight.update == 20
    for k, v in straight.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[k], v), k
    # and the sampler made a difference: a random order trains other weights
    other = trainer()
    other.fit(InMemoryLoader(x, y, 8, shuffle=True, seed=3), None)
    assert not torch.equal(other.module[0].weight, straight.module[0].weight)


def test_random_sampler_is_unchanged():
    """dataset.sampler=random (the default) is today's seeded permutation, bit for bit."""
    s = SeededSampler(30, 7, shuffle=True, seed=4)
    expected = torch.randperm(30, generator=torch.Generator().manual_seed(4 * 1_000_003 + 1))
    assert torch.equal(s.order(1), expected)
    assert type(s.sharded(1, 2)) is SeededSampler


@pytest.mark.slow
def test_balanced_sampler_and_class_weights_end_to_end(bprun):
    """Both loaders take dataset.sampler=balanced from the command line and train on it; a
    regression dataset has no classes to balance."""
    common = ["dataset=digits", "model=mlp", "model.hidden=[32]", "trainer.max_epochs=2"]
    memory = bprun(*common, "dataset.sampler=balanced", "loss=focal", "loss.class_weights=balanced")
    streamed = bprun(
        *common,
        "dataset.sampler=balanced",
        "loss=focal",
        "loss.class_weights=balanced",
        "dataset.loader=stream",
        "dataset.num_workers=0",
        f"hydra.run.dir={memory.run_dir}_stream",
    )
    assert memory.metrics["test"]["test/acc"] > 0.3  # chance is 0.1; two short epochs
    assert streamed.metrics["test"] == memory.metrics["test"]  # the same batches either way
    r = bprun(
        "dataset=regression",
        "dataset.sampler=balanced",
        f"hydra.run.dir={memory.run_dir}_regression",
        check=False,
    )
    assert r.returncode == 1 and "use dataset.sampler=random" in r.output
    assert not r.run_dir.exists()
