"""End-to-end runs of the training-loop features through the real command."""

from __future__ import annotations

import pytest
import torch


def test_early_stopping_in_a_real_run(bprun):
    # min_delta 10: nothing after the first check counts as improvement -> stop at check 3
    r = bprun(
        "trainer.max_epochs=20",
        "trainer.early_stopping.patience=2",
        "trainer.early_stopping.min_delta=10",
    )
    m = r.metrics
    assert m["epochs"] == 3
    assert m["stop_reason"].startswith("early stopping: val/loss did not improve in the last 2")
    assert "early stopping" in r.stdout


def test_early_stopping_threshold_on_accuracy(bprun):
    r = bprun(
        "model=cnn",
        "optim=adamw",
        "trainer.max_epochs=30",
        "trainer.early_stopping.monitor=val/acc",
        "trainer.early_stopping.mode=max",
        "trainer.early_stopping.stopping_threshold=0.5",
    )
    m = r.metrics
    assert m["epochs"] < 30 and "stopping threshold" in m["stop_reason"]
    assert m["history"][-1]["val/acc"] > 0.5 and all(h["val/acc"] <= 0.5 for h in m["history"][:-1])


PROBE = """
from bprun.models import CNN


class ProbedCNN(CNN):
    \"\"\"The shipped CNN, noting the dtype of its output in training and evaluation.\"\"\"

    def forward(self, x):
        out = super().forward(x)
        seen = f"{'train' if self.training else 'eval'} {out.dtype}\\n"
        if seen not in getattr(self, "seen", ()):
            self.seen = {*getattr(self, "seen", ()), seen}
            with open("forward_dtypes.txt", "a") as f:
                f.write(seen)
        return out
"""


@pytest.mark.slow
def test_bf16_mixed_trains_the_cnn_on_cpu(bprun, tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)  # the run's working directory
    m = bprun(
        "model=cnn",
        "model._target_=probe.ProbedCNN",
        "optim=adamw",
        "trainer.precision=bf16-mixed",
        "trainer.max_epochs=10",
    ).metrics
    seen = (tmp_path / "forward_dtypes.txt").read_text().split("\n")
    assert sorted(filter(None, seen)) == ["eval torch.bfloat16", "train torch.bfloat16"]
    assert m["test"]["test/acc"] >= 0.85


def test_nonfinite_loss_stops_naming_update_and_last_good_checkpoint(bprun):
    r = bprun("optim=sgd", "optim.lr=1e30", "trainer.max_epochs=3", check=False)
    assert r.returncode != 0 and "Traceback" not in r.output
    assert "loss became non-finite (nan) at update 2 (epoch 1)" in r.output
    assert "no checkpoint was written before it" in r.output
    assert r.metrics["status"] == "failed"
    # the failed run is in TensorBoard's HPARAMS tab, with its settings and status failure
    from tensorboard.plugins.hparams import api_pb2
    from test_tensorboard import events, hparams_of

    values, status = hparams_of(events(r.run_dir))
    assert status == api_pb2.STATUS_FAILURE
    assert values["optim"] == "sgd" and values["optim.lr"] == 1e30


def test_divergence_after_epoch_1_keeps_only_finite_checkpoints(bprun):
    # epoch 2 runs at an infinite learning rate: its first update blows the weights up
    r = bprun(
        "optim=sgd",
        "sched=step",
        "sched.step_size=1",
        "sched.gamma=inf",
        "trainer.max_epochs=3",
        "trainer.checkpoint.every_n_updates=1",
        "trainer.checkpoint.last_every_n_seconds=0",  # last.pt at the end of epoch 1 too
        check=False,
    )
    last = r.run_dir / "checkpoints" / "last.pt"
    assert r.returncode == 1 and "Traceback" not in r.output
    assert "non-finite" in r.output and "at update 37 (epoch 2" in r.output
    assert f"last good checkpoint: {last}." in r.output
    assert r.metrics["status"] == "failed"
    assert torch.load(last, weights_only=True)["progress"]["update"] == 36
    files = list(last.parent.glob("*.pt"))
    assert len(files) == 2  # last.pt and the best, epoch 1
    for f in files:
        tensors = list(_tensors(torch.load(f, weights_only=True)))
        assert tensors and all(bool(t.isfinite().all()) for t in tensors), f.name


def _tensors(tree):
    if torch.is_tensor(tree):
        if tree.is_floating_point():
            yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _tensors(v)


def test_nonfinite_skip_counts_and_gives_up(bprun):
    r = bprun(
        "optim=sgd",
        "optim.lr=1e30",
        "trainer.nonfinite=skip",
        "trainer.max_consecutive_skips=3",
        check=False,
    )
    assert r.returncode != 0 and "consecutive updates had a non-finite loss" in r.output
    assert "update skipped" in r.output


def test_fast_dev_run_writes_no_checkpoints(bprun):
    r = bprun("trainer.fast_dev_run=true")
    m = r.metrics
    assert m["epochs"] == 1 and m["updates"] == 2
    assert not (r.run_dir / "checkpoints").exists()
    assert m["status"] == "completed" and "test/acc" in m["test"]


def test_limit_train_batches_fraction_and_count(bprun, tmp_path):
    assert (
        bprun(
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=0.25",
            f"hydra.run.dir={tmp_path}/a",
        ).metrics["updates"]
        == 9
    )
    assert (
        bprun(
            "trainer.max_epochs=2", "trainer.limit_train_batches=5", f"hydra.run.dir={tmp_path}/b"
        ).metrics["updates"]
        == 10
    )


def test_overfit_batches_drives_training_loss_down(bprun):
    m = bprun("trainer.overfit_batches=2", "trainer.max_epochs=60", "optim.lr=0.003").metrics
    assert m["updates"] == 120
    assert m["history"][-1]["val/acc"] == 1.0  # validation is on the same two batches
    assert m["history"][-1]["train/loss"] < 0.05


def test_detect_anomaly_runs(bprun):
    assert (
        bprun("trainer.detect_anomaly=true", "trainer.max_updates=3").metrics["status"]
        == "completed"
    )


def test_gradient_clipping_and_accumulation_from_the_command_line(bprun):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = bprun(
        "trainer.max_epochs=1",
        "trainer.grad_clip.max=0.5",
        "trainer.accumulate=3",
        "trainer.log_every_n_updates=4",
    )
    assert r.metrics["updates"] == 12
    acc = EventAccumulator(str(r.run_dir))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/grad_norm")] == [4, 8, 12]


def test_limit_val_batches_and_save_top_k_all_or_none(bprun, tmp_path):
    # 400 validation samples in batches of 100
    r = bprun(
        "trainer.max_epochs=3",
        "dataset.eval_batch_size=100",
        "trainer.limit_val_batches=2",
        "trainer.checkpoint.save_top_k=-1",
        f"hydra.run.dir={tmp_path}/all",
    )
    assert "3600 train / 200 val / 1000 test samples" in r.output
    hits = [h["val/acc"] * 200 for h in r.metrics["history"]]  # float32 metrics: within 1e-4
    assert all(abs(n - round(n)) < 1e-4 for n in hits)
    kept = sorted(p.name[:9] for p in (r.run_dir / "checkpoints").glob("epoch=*.pt"))
    assert kept == ["epoch=001", "epoch=002", "epoch=003"]  # -1 keeps every one

    r = bprun(
        "trainer.max_epochs=2",
        "dataset.eval_batch_size=100",
        "trainer.limit_val_batches=0.25",
        "trainer.checkpoint.save_top_k=0",
        f"hydra.run.dir={tmp_path}/none",
    )
    assert "3600 train / 100 val / 1000 test samples" in r.output
    assert [p.name for p in (r.run_dir / "checkpoints").iterdir()] == ["last.pt"]
    assert r.metrics["status"] == "completed" and "test/acc" in r.metrics["test"]
