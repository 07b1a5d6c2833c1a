"""Unit tests of the training loop on small in-memory problems."""

from __future__ import annotations

import copy
import math
import os
import signal

import pytest
import torch
from torch import nn

from bprun.data import InMemoryLoader
from bprun.engine import Trainer, TrainerSettings
from bprun.engine.early_stopping import EarlyStopper
from bprun.engine.settings import GradClip
from bprun.engine.trainer import NonFiniteLoss
from bprun.errors import BprunError, Interrupted


def problem(n=230, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x, y.clamp(max=classes - 1)


def mlp(d=6, classes=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, classes))


def fit(model, x, y, batch_size, optimizer=None, **settings):
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.1)
    s = TrainerSettings(progress=False, **settings)
    trainer = Trainer(s, model, nn.CrossEntropyLoss(), optimizer, num_classes=3)
    loader = InMemoryLoader(x, y, batch_size, shuffle=True, seed=0)
    trainer.fit(loader, InMemoryLoader(x, y, 1000))
    return trainer


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("n", [230, 233])
def test_accumulation_matches_one_large_batch(k, n):
    # 230: the last window has fewer micro-batches; 233: its last micro-batch is short too
    x, y = problem(n=n)
    small, big = mlp(), mlp()
    fit(small, x, y, batch_size=10, accumulate=k, max_epochs=3)
    fit(big, x, y, batch_size=10 * k, max_epochs=3)
    for a, b in zip(small.parameters(), big.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(small[0].weight, mlp()[0].weight)  # training happened


def test_updates_equal_a_hand_written_loop_bit_for_bit():
    """The engine's step (its batches, backward, Adam step, gradients cleared) is the loop a
    user writes, to the last bit."""
    x, y = problem(n=230)
    model, plain = mlp(), mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    trainer = Trainer(
        TrainerSettings(progress=False, max_epochs=3),
        model,
        nn.CrossEntropyLoss(),
        optimizer,
        num_classes=3,
    )
    trainer.fit(InMemoryLoader(x, y, 32, shuffle=True, seed=3), None)
    by_hand = torch.optim.Adam(plain.parameters(), lr=0.01)
    for epoch in range(3):
        order = torch.randperm(230, generator=torch.Generator().manual_seed(3 * 1_000_003 + epoch))
        for idx in order.split(32):
            nn.functional.cross_entropy(plain(x[idx]), y[idx]).backward()
            by_hand.step()
            by_hand.zero_grad()
    assert trainer.update == 3 * 8
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)


def test_accumulation_counts_optimizer_updates():
    x, y = problem(n=230)
    t = fit(mlp(), x, y, batch_size=10, accumulate=4, max_epochs=2)
    assert t.update == 2 * math.ceil(23 / 4)


def test_training_lowers_loss_and_reaches_accuracy():
    x, y = problem(n=400)
    t = fit(mlp(), x, y, batch_size=20, max_epochs=15)
    assert t.history[-1]["val/loss"] < t.history[0]["val/loss"]
    assert t.history[-1]["val/acc"] > 0.85


class Logged(dict):
    """A tracker that keeps the last value logged under each name."""

    def log(self, scalars, step):
        self.update(scalars)


def test_grad_clip_norm_bounds_the_update_and_logs_the_norm():
    x, y = problem()
    model = mlp()
    logged = Logged()

    s = TrainerSettings(progress=False, max_updates=1, grad_clip=GradClip("norm", 1e-3))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    t = Trainer(s, model, nn.CrossEntropyLoss(), opt, num_classes=3, tracker=logged)
    t.fit(InMemoryLoader(x, y, 50, shuffle=True), None)
    step = torch.cat([(p - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
    assert step.norm() <= 1e-3 * 1.0001  # lr 1 x clipped gradient norm
    assert logged["train/grad_norm"] > 1e-3  # the norm before clipping


def test_grad_clip_value_bounds_every_element_and_logs_the_norm_before():
    x, y = problem()
    model = mlp()
    logged = Logged()

    s = TrainerSettings(progress=False, max_updates=1, grad_clip=GradClip("value", 1e-3))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    Trainer(s, model, nn.CrossEntropyLoss(), opt, num_classes=3, tracker=logged).fit(
        InMemoryLoader(x, y, 50, shuffle=True), None
    )
    step = torch.cat([(p - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
    assert step.abs().max().item() == pytest.approx(
        1e-3, rel=1e-5
    )  # lr 1 x each gradient clipped to 1e-3
    assert step.norm() > 1e-3 * 1.0001  # values, not the norm, were clipped
    assert logged["train/grad_norm"] > 1e-2


def test_clipping_scales_whole_and_sharded_gradients_by_the_same_factor():
    """FSDP holds each gradient as shards and sums the norm shard by shard, one process sums
    each gradient whole: the clipped gradients must agree to the bit, or a BatchNorm network
    under Adam drifts apart within a few updates. Here the shards are halves of each tensor."""
    from bprun.engine.clipping import clip_grad_norm

    def with_grads(grads):
        params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        return params

    def norm32(grads):  # the float32 sum: its last bits follow the layout
        return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))

    torch.manual_seed(0)
    grads = [torch.randn(n) * scale for n, scale in ((1000, 1e-3), (4097, 1.0), (333, 10.0))]
    halves = [half for g in grads for half in g.tensor_split(2)]
    assert norm32(grads) != norm32(halves)  # so the layout could show
    whole, sharded = with_grads(grads), with_grads(halves)
    clip_grad_norm(whole, 0.1)
    clip_grad_norm(sharded, 0.1)
    clipped = torch.cat([p.grad for p in whole])
    assert torch.equal(clipped, torch.cat([p.grad for p in sharded]))
    assert clipped.norm().item() == pytest.approx(0.1, rel=1e-5)


def test_clipping_sees_unscaled_gradients_on_the_cpu():
    """The GradScaler path without CUDA: a CPU GradScaler, clipping after unscale."""
    x, y = problem()
    model = mlp()
    logged = Logged()

    reference = mlp()
    loss = nn.functional.cross_entropy(reference(x[:50]), y[:50])
    true_norm = torch.cat([g.flatten() for g in torch.autograd.grad(loss, reference.parameters())])
    s = TrainerSettings(progress=False, max_updates=1, grad_clip=GradClip("norm", 1e-3))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    t = Trainer(s, model, nn.CrossEntropyLoss(), opt, num_classes=3, tracker=logged)
    t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    before = [p.detach().clone() for p in model.parameters()]
    t.fit(InMemoryLoader(x, y, 50), None)
    step = torch.cat([(p - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
    # clipped to 1e-3 after unscaling: clipping the scaled gradient (4096x) and then
    # unscaling would leave a step of 1e-3 / 4096
    assert step.norm().item() == pytest.approx(1e-3, rel=1e-3)
    assert logged["train/grad_norm"] == pytest.approx(true_norm.norm().item(), rel=1e-4)


def test_bf16_autocast_on_cpu_trains():
    x, y = problem(n=400)
    model = mlp()
    seen = set()  # (training, output dtype) of every forward pass
    model.register_forward_hook(lambda m, args, out: seen.add((m.training, out.dtype)))
    t = fit(model, x, y, batch_size=20, max_epochs=10, precision="bf16-mixed")
    assert seen == {(True, torch.bfloat16), (False, torch.bfloat16)}  # train and validation
    assert model[0].weight.dtype == torch.float32  # the weights stay float32
    assert t.history[-1]["val/acc"] > 0.8


def test_16_mixed_on_cpu_is_a_clear_error():
    with pytest.raises(BprunError, match="bf16-mixed"):
        fit(mlp(), *problem(), batch_size=10, precision="16-mixed")


def test_lbfgs_trains_through_a_closure_and_refuses_accumulation():
    x, y = problem(n=200)
    model = mlp()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5)
    t = fit(model, x, y, batch_size=200, optimizer=opt, max_epochs=5)
    assert t.history[-1]["val/loss"] < t.history[0]["val/loss"] - 0.1
    with pytest.raises(BprunError, match="accumulate"):
        fit(mlp(), x, y, 10, optimizer=torch.optim.LBFGS(mlp().parameters()), accumulate=2)


def test_step_scheduler_counts_updates_and_epoch_scheduler_counts_epochs():
    x, y = problem(n=100)
    for interval, expected in (("step", 2 * 10), ("epoch", 2)):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        s = TrainerSettings(progress=False, max_epochs=2, accumulate=2)
        Trainer(
            s,
            model,
            nn.CrossEntropyLoss(),
            opt,
            sched,
            scheduler_interval=interval,
            num_classes=3,
        ).fit(InMemoryLoader(x, y, 5, shuffle=True), InMemoryLoader(x, y, 100))
        assert sched.last_epoch == expected


@pytest.mark.parametrize("monitor, mode", [("val/loss", "min"), ("val/acc", "max")])
def test_plateau_scheduler_receives_the_monitored_metric(monitor, mode):
    x, y = problem(n=100)
    vx, vy = problem(n=60, seed=1)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # threshold 0: every strict improvement becomes the scheduler's `best`
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, patience=1, threshold=0)
    s = TrainerSettings(progress=False, max_epochs=6, monitor=monitor, mode=mode)
    t = Trainer(
        s, model, nn.CrossEntropyLoss(), opt, sched, scheduler_interval="epoch", num_classes=3
    )
    t.fit(InMemoryLoader(x, y, 50), InMemoryLoader(vx, vy, 100))
    values = [h[monitor] for h in t.history]
    assert sched.best == (min(values) if mode == "min" else max(values))
    assert sched.last_epoch == 6


@pytest.mark.parametrize("accumulate, update", [(1, 4), (2, 2)])
def test_nonfinite_loss_stops_and_names_the_update(accumulate, update):
    x, y = problem()
    x[37] = float("nan")  # in order, batch 3 of 10 samples: update 4, or 2 with windows of 2
    s = TrainerSettings(progress=False, max_epochs=3, accumulate=accumulate)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    t = Trainer(s, model, nn.CrossEntropyLoss(), opt, num_classes=3)
    # checked at the end of the epoch (log interval 50), naming the update that saw it
    with pytest.raises(NonFiniteLoss, match=rf"non-finite \(nan\) at update {update} \(epoch 1\)"):
        t.fit(InMemoryLoader(x, y, 10), None)


def test_nonfinite_skip_skips_and_gives_up_after_consecutive_skips():
    x, y = problem(n=100)
    x[5] = float("nan")
    t = fit(mlp(), x, y, batch_size=10, max_epochs=3, nonfinite="skip")
    assert t.skipped == 3  # the batch holding sample 5, once per epoch
    assert all(torch.isfinite(p).all() for p in t.module.parameters())
    x[:] = float("nan")
    with pytest.raises(NonFiniteLoss, match="consecutive"):
        fit(mlp(), x, y, batch_size=10, max_epochs=3, nonfinite="skip", max_consecutive_skips=4)


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_saves_and_a_second_one_aborts_at_once(presses, tmp_path):
    x, y = problem()
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the suite was started detached

    class CtrlC:
        def on_update_end(self, trainer):
            if trainer.update == 3:
                for _ in range(presses):
                    os.kill(os.getpid(), signal.SIGINT)

    s = TrainerSettings(progress=False, max_epochs=3)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    t = Trainer(s, model, nn.CrossEntropyLoss(), opt, run_dir=tmp_path, callbacks=[CtrlC()])
    last = tmp_path / "checkpoints" / "last.pt"
    if presses == 1:  # finish the update, save, stop
        with pytest.raises(Interrupted, match="stopped by SIGINT after update 3; saved"):
            t.fit(InMemoryLoader(x, y, 10, shuffle=True), None)
        assert torch.load(last, weights_only=True)["progress"]["update"] == 3
    else:  # stop now, without saving
        with pytest.raises(KeyboardInterrupt):
            t.fit(InMemoryLoader(x, y, 10, shuffle=True), None)
        assert not last.exists()
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_limit_batches_and_max_updates():
    x, y = problem(n=200)
    t = fit(mlp(), x, y, batch_size=10, max_epochs=3, max_updates=25)
    assert t.update == 25 and "max_updates" in t.stop_reason


# ---------------------------------------------------------------- early stopping
def feed(stopper, values):
    for i, v in enumerate(values):
        if stopper.step(v):
            return i
    return None


def test_early_stopping_patience_counts_checks_without_improvement():
    assert feed(EarlyStopper(patience=2), [5, 4, 4.5, 4.2, 3]) == 3
    assert feed(EarlyStopper(patience=2), [5, 4, 4.5, 3.9, 4.0, 3.95]) == 5


def test_early_stopping_min_delta_and_max_mode():
    assert feed(EarlyStopper(patience=1, min_delta=0.5), [5, 4.8, 4]) == 1
    assert feed(EarlyStopper(mode="max", patience=2), [0.5, 0.6, 0.6, 0.55]) == 3


def test_early_stopping_check_order():
    """Non-finite, stopping threshold, divergence, improvement: each pair that would both
    fire on one value is decided by that order."""
    inf = float("inf")
    # non-finite beats divergence: +inf is also past a divergence threshold
    s = EarlyStopper(patience=5, divergence_threshold=10.0)
    assert feed(s, [2.0, inf]) == 1 and "not finite" in s.stopped_reason
    # non-finite beats the stopping threshold: -inf also "beats" 1.0 in min mode
    s = EarlyStopper(patience=5, stopping_threshold=1.0)
    assert feed(s, [2.0, -inf]) == 1 and "not finite" in s.stopped_reason
    # stopping threshold beats divergence when one value passes both
    s = EarlyStopper(patience=5, stopping_threshold=5.0, divergence_threshold=3.0)
    assert feed(s, [4.0]) == 0 and "stopping threshold" in s.stopped_reason
    # divergence beats improvement: a first value past the threshold stops at once
    s = EarlyStopper(patience=5, divergence_threshold=10.0)
    assert feed(s, [11.0]) == 0 and "divergence threshold" in s.stopped_reason
    # the stopping threshold also beats improvement (and patience)
    s = EarlyStopper(patience=5, stopping_threshold=1.0)
    assert feed(s, [0.5]) == 0 and "stopping threshold" in s.stopped_reason
    # with check_finite off, NaN falls through to the improvement check
    s = EarlyStopper(patience=5, check_finite=False)
    assert feed(s, [2.0, float("nan"), 1.0]) is None and s.best == 1.0


def test_early_stopping_state_round_trip():
    a = EarlyStopper(patience=3)
    feed(a, [5, 4, 4.5])
    b = EarlyStopper(patience=3)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert feed(a, [4.4, 4.3]) == feed(b, [4.4, 4.3]) == 1
