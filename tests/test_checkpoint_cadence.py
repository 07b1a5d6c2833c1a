"""last.pt at most every `trainer.checkpoint.last_every_n_seconds`, and always at the end."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from bprun.data import InMemoryLoader
from bprun.engine import Trainer, TrainerSettings
from bprun.engine import checkpoint as ckpt_io
from bprun.engine.callbacks import Callback
from bprun.engine.settings import Checkpointing
from bprun.errors import BprunError


class SlowEpochs(Callback):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_epoch_end(self, trainer, metrics) -> None:
        time.sleep(self.seconds)


def writes_of_last(monkeypatch, tmp_path, epochs=6, max_updates=None, callbacks=(), **ckpt):
    """(epoch, update) in each last.pt written by a run of `epochs` epochs of 4 updates."""
    written = []
    save = ckpt_io.atomic_save

    def recording(obj, path):
        if path.name == "last.pt":
            written.append((obj["progress"]["epoch"], obj["progress"]["update"]))
        return save(obj, path)

    monkeypatch.setattr(ckpt_io, "atomic_save", recording)
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(32, 3), torch.randint(0, 2, (32,))
    s = TrainerSettings(
        max_epochs=epochs,
        max_updates=max_updates,
        progress=False,
        checkpoint=Checkpointing(**ckpt),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer(s, model, nn.CrossEntropyLoss(), opt, run_dir=tmp_path, callbacks=callbacks)
    trainer.fit(InMemoryLoader(x, y, 8, shuffle=True, seed=0), None)
    return written


def test_tiny_epochs_write_last_once_at_the_end_by_default(monkeypatch, tmp_path):
    assert writes_of_last(monkeypatch, tmp_path) == [(6, 24)]
    state = ckpt_io.load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["progress"]["epoch"] == 6  # what a resume continues from: the finished run


def test_every_epoch_when_switched_to_null_or_when_epochs_are_slow(monkeypatch, tmp_path):
    every = [(e, 4 * e) for e in range(1, 7)]
    assert writes_of_last(monkeypatch, tmp_path, last_every_n_seconds=None) == every
    slow = [SlowEpochs(0.03)]
    assert writes_of_last(monkeypatch, tmp_path, callbacks=slow, last_every_n_seconds=0.02) == every


def test_a_stop_mid_epoch_and_every_n_updates_still_write(monkeypatch, tmp_path):
    assert writes_of_last(monkeypatch, tmp_path, max_updates=10) == [(3, 10)]
    got = writes_of_last(monkeypatch, tmp_path, every_n_updates=10)
    assert got == [(2, 10), (4, 20), (6, 24)]  # (epoch in flight, update) mid-epoch


def test_negative_interval_is_a_clear_error():
    with pytest.raises(BprunError, match="last_every_n_seconds must be >= 0"):
        TrainerSettings(checkpoint=Checkpointing(last_every_n_seconds=-1))
