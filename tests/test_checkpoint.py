"""Checkpoints, exact resume, preemption and bad input, with real processes."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import BPRUN

from bprun.engine import checkpoint as ckpt_io
from bprun.errors import BprunError

# A small run with everything that decides its future: accumulation, a per-update
# scheduler, dropout (RNG), and a checkpoint after every update.
RESUMABLE = {
    "mlp": ["model=mlp", "model.hidden=[64]", "model.dropout=0.1"],
    "cnn": ["model=cnn", "model.channels=[8,16]", "model.dropout=0.2"],
}
COMMON = [
    "trainer.max_epochs=4",
    "trainer.accumulate=2",
    "sched=cosine",
    "sched.interval=step",
    "trainer.checkpoint.every_n_updates=1",
    "optim=adamw",
]


def start(args, data_dir, run_dir=None):
    """The real command in the background; run_dir=None for a resume (it names its folder)."""
    cmd = [
        BPRUN,
        f"paths.data_dir={data_dir}",
        "trainer.threads=1",
        "trainer.progress=false",
        *([f"hydra.run.dir={run_dir}"] if run_dir else []),
        *args,
    ]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def saved_update(path: Path) -> int:
    try:
        return torch.load(path, weights_only=True)["progress"]["update"]
    except Exception:
        return -1


def wait_for_update(proc, last: Path, update: int, timeout=120) -> None:
    deadline = time.time() + timeout
    seen, saved = None, -1
    while saved < update:
        # atomic_save replaces the file: read it again only when it is another one (polling
        # with torch.load would take CPU from the run it waits for)
        with contextlib.suppress(FileNotFoundError):
            if (now := _identity(last)) != seen:
                seen, saved = now, saved_update(last)
        assert proc.poll() is None, f"run ended before update {update}:\n{proc.stdout.read()}"
        assert time.time() < deadline
        time.sleep(0.005)


def resumed_at(update: int, out: str) -> bool:
    return re.search(rf"resumed from \S+ at epoch \d+, update {update}\b", out) is not None


def model_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_sigkill_then_resume_is_bit_identical(model, bprun, data_dir, tmp_path):
    args = RESUMABLE[model] + COMMON
    reference = bprun(*args, f"hydra.run.dir={tmp_path}/ref")
    assert reference.metrics["updates"] == 4 * 18
    expected = model_state(reference.run_dir)
    # One run killed three times, each time resumed by a process that is killed in turn:
    # early, at an epoch boundary (18 updates/epoch), mid-epoch later on. Every resume
    # must continue exactly, or the weights at the end differ from the reference's.
    run_dir = tmp_path / "killed"
    last = run_dir / "checkpoints" / "last.pt"
    proc, resumed_from = start(args, data_dir, run_dir), None
    for kill_at in (3, 18, 41):
        wait_for_update(proc, last, kill_at)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        if resumed_from is not None:
            assert resumed_at(resumed_from, out), out
        resumed_from = saved_update(last)
        assert resumed_from < 72, "the run finished before it was killed"
        proc = start([f"trainer.resume={run_dir}"], data_dir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert resumed_at(resumed_from, out), out
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert resumed["updates"] == 72
    got = model_state(run_dir)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), f"{k} differs after resumes"
    assert resumed["test"] == reference.metrics["test"]


def interrupt(signum, data_dir, run_dir) -> tuple[str, int]:
    """Start a run with last.pt at epoch ends only (36 updates each, every one logged),
    send `signum` early in epoch 2; return the output and the update it stopped after."""
    args = [
        "trainer.max_epochs=50",
        "trainer.log_every_n_updates=1",
        "trainer.checkpoint.last_every_n_seconds=0",  # last.pt at every epoch's end
    ]
    proc = start(args, data_dir, run_dir)
    wait_for_update(proc, run_dir / "checkpoints" / "last.pt", 36)
    time.sleep(0.05)
    sent = time.time()
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, out  # 143 for SIGTERM, 130 for SIGINT
    assert time.time() - sent < 10
    assert "Traceback" not in out
    name = signal.Signals(signum).name
    stopped = int(re.search(rf"stopped by {name} after update (\d+); saved ", out)[1])
    # the signal itself saved last.pt: the epoch-end checkpoint holds update 36
    assert saved_update(run_dir / "checkpoints" / "last.pt") == stopped > 36, out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["updates"] == stopped
    return out, stopped


def test_sigterm_saves_prints_resume_command_and_it_works(bprun, data_dir, tmp_path):
    run_dir = tmp_path / "run"
    out, stopped = interrupt(signal.SIGTERM, data_dir, run_dir)
    command = next(
        line.strip()
        for line in out.splitlines()
        if line.strip().startswith("bprun trainer.resume=")
    )
    # the printed command works (with fewer epochs, as another override on the line)
    resumed = bprun(*command.split()[1:], "trainer.max_epochs=3")
    assert f"update {stopped}" in resumed.stdout
    m = resumed.metrics
    assert m["status"] == "completed" and m["updates"] == 3 * 36
    assert m["resumed_from"] == str(run_dir / "checkpoints" / "last.pt")
    # the resumed process logs from the update after the one the signal saved
    newest = max(run_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns)
    assert scalar_steps(newest)["train/loss"] == list(range(stopped + 1, 3 * 36 + 1))


# SIGUSR2: what submitit sends before a SLURM time limit (hydra_plugins/bprun_submitit)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2])
def test_sigint_and_sigusr_save_and_exit_128_plus_signal(signum, data_dir, tmp_path):
    out, _ = interrupt(signum, data_dir, tmp_path / "run")
    assert f"bprun trainer.resume={tmp_path / 'run'}" in out


def scalar_steps(run_dir: Path) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_resume_continues_tensorboard_without_duplicate_steps(bprun, data_dir, tmp_path):
    """A run dies after its event file got ahead of last.pt; the resumed curves have
    no repeated steps. (TensorBoard buffers events, so a SIGKILL leaves a random
    amount past the checkpoint; here the run finishes and last.pt is then put back
    to a mid-epoch copy, which is what a crash at that checkpoint leaves behind.)"""
    args = [
        "trainer.max_epochs=2",
        "trainer.log_every_n_updates=1",
        "trainer.checkpoint.every_n_updates=1",
    ]
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.pt"
    proc = start(args, data_dir, run_dir)
    wait_for_update(proc, last, 40)
    mid = shutil.copy(last, tmp_path / "mid.pt")  # atomic_save: always a whole file
    assert proc.wait(timeout=120) == 0
    saved = saved_update(mid)
    assert 36 < saved < 72  # mid-epoch 2
    assert max(scalar_steps(run_dir)["train/loss"]) == 72  # logged past it
    shutil.copy(mid, last)

    bprun(f"trainer.resume={run_dir}")
    steps = scalar_steps(run_dir)
    assert steps["train/loss"] == list(range(1, 73))
    assert steps["val/loss"] == [36, 72]
    for tag, s in steps.items():
        assert s == sorted(set(s)), f"{tag} has repeated or unordered steps"


def test_top_k_keeps_the_best_and_names_files(bprun):
    r = bprun("trainer.max_epochs=6", "trainer.checkpoint.save_top_k=2", "optim.lr=0.01")
    files = sorted(p.name for p in (r.run_dir / "checkpoints").glob("epoch=*.pt"))
    assert len(files) == 2
    history = r.metrics["history"]
    best_two = sorted(history, key=lambda h: h["val/loss"])[:2]
    for h in best_two:
        assert any(
            f.startswith(f"epoch={h['epoch']:03d}-step={h['update']}-val_loss=") for f in files
        )
    state = torch.load(r.run_dir / "checkpoints" / files[0], weights_only=True)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in state["model"])
    assert {"model", "optimizer", "rng", "progress", "early_stopping", "topk", "extra"} <= set(
        state
    )
    assert "model:" in state["extra"]["config"]


def test_interrupted_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt_io.atomic_save({"model": {"w": torch.zeros(3)}}, path)

    def crash(*a, **k):
        raise OSError("disk vanished")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        ckpt_io.atomic_save({"model": {"w": torch.ones(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(ckpt_io.load_checkpoint(path)["model"]["w"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def _save_forever(path: Path) -> None:
    i = 0
    while True:
        i += 1
        ckpt_io.atomic_save({"model": {"w": torch.full((4_000_000,), float(i))}}, path)


def _identity(path: Path) -> tuple:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


def test_process_killed_during_large_saves_never_leaves_a_torn_file(tmp_path):
    path = tmp_path / "last.pt"
    ckpt_io.atomic_save({"model": {"w": torch.zeros(1)}}, path)
    # A forked writer has torch imported already, so every kill lands among its saves.
    fork = multiprocessing.get_context("fork")
    rng = random.Random(0)
    mid_write = 0
    for _ in range(8):
        before = _identity(path)
        writer = fork.Process(target=_save_forever, args=(path,), daemon=True)
        writer.start()
        deadline = time.time() + 60
        while _identity(path) == before:  # it has written the file at least once
            assert writer.is_alive() and time.time() < deadline
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.1))
        writer.kill()
        writer.join()
        leftovers = [p for p in tmp_path.iterdir() if p.name != "last.pt"]
        mid_write += bool(leftovers)  # SIGKILL leaves the temporary file of a write under way
        for p in leftovers:
            p.unlink()
        w = ckpt_io.load_checkpoint(path)["model"]["w"]
        assert w.numel() == 4_000_000 and w[0] >= 1 and bool((w == w[0]).all())
    assert mid_write >= 2, "no kill landed during a write: the test proves nothing"


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/bprun-payload-ran")


def test_malicious_checkpoint_is_refused_and_never_runs(bprun, tmp_path):
    MARKER.unlink(missing_ok=True)
    run_dir = tmp_path / "evil"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"model": {}, "x": Payload()}, run_dir / "checkpoints" / "last.pt")
    for args in ([f"trainer.resume={run_dir}"], ["task=eval", f"ckpt={run_dir}"]):
        r = bprun(*args, check=False)
        assert r.returncode != 0
        assert "refused to load" in r.output and "Traceback" not in r.output
        assert not MARKER.exists()


def test_impossible_combination_is_a_clear_error(bprun):
    r = bprun("trainer.precision=16-mixed", "trainer.device=cpu", check=False)
    assert r.returncode != 0 and "bf16-mixed" in r.output and "Traceback" not in r.output


def test_eval_of_a_run_folder_rebuilds_its_config_and_tests_its_best_checkpoint(bprun, tmp_path):
    # The eval command composes the default model (mlp): eval must rebuild the run's cnn.
    # At this learning rate val/loss is lowest before the last epoch.
    trained = bprun(
        "model=cnn",
        "model.channels=[8,16]",
        "optim=adamw",
        "optim.lr=0.1",
        "trainer.max_epochs=8",
    )
    m = trained.metrics
    assert m["best"]["epoch"] < m["epochs"] == 8
    ckpts = trained.run_dir / "checkpoints"
    (best,) = ckpts.glob(f"epoch={m['best']['epoch']:03d}-*.pt")

    def evaluate(target: Path, name: str) -> dict:
        r = bprun("task=eval", f"ckpt={target}", f"hydra.run.dir={tmp_path}/{name}")
        assert "test/acc" in r.stdout
        return json.loads((ckpts / "eval.json").read_text())

    # a run folder means its best checkpoint: the weights the run's own test used
    of_folder, of_last = evaluate(trained.run_dir, "a"), evaluate(ckpts / "last.pt", "b")
    assert of_folder["checkpoint"] == str(best)
    assert {k: of_folder[k] for k in m["test"]} == m["test"]
    assert of_last["test/loss"] != m["test"]["test/loss"]


def test_checkpoint_errors_are_bprun_errors(tmp_path):
    with pytest.raises(BprunError, match="no such file"):
        ckpt_io.resolve_checkpoint(tmp_path / "missing")
    with pytest.raises(BprunError, match="no checkpoints/last.pt"):
        ckpt_io.resolve_checkpoint(tmp_path)


def test_bad_resume_inputs_give_one_line_errors_and_change_nothing(bprun, tmp_path):
    # (a path that does not exist: test_first_hour's mistakes and the unit test above)
    for sched in ("cosine", "onecycle"):
        run = tmp_path / sched
        bprun("trainer.max_epochs=1", f"sched={sched}", f"hydra.run.dir={run}")
        last = run / "checkpoints" / "last.pt"
        before = sorted(p.name for p in run.rglob("*"))
        if sched == "cosine":
            data = last.read_bytes()
            last.write_bytes(data[: len(data) // 2])  # truncated
            r = bprun(f"trainer.resume={run}", check=False)
            assert r.returncode != 0 and "truncated or corrupted" in r.output
            assert "Traceback" not in r.output
            assert sorted(p.name for p in run.rglob("*")) == before  # nothing lost or added
            last.write_bytes(data)
            more = "trainer.max_epochs=50"  # a finished run resumes only to train on
            r = bprun(f"trainer.resume={run}", "model.hidden=[32]", more, check=False)
            assert r.returncode != 0 and "does not match" in r.output
            assert "blocks.0.0.weight" in r.output and "Traceback" not in r.output
            assert sorted(p.name for p in run.rglob("*")) == before
        # a schedule built for one epoch cannot stretch over two
        r = bprun(f"trainer.resume={run}", "trainer.max_epochs=2", check=False)
        assert r.returncode != 0 and "scheduler steps" in r.output
        assert "max_epochs" in r.output and "Traceback" not in r.output
        assert sorted(p.name for p in run.rglob("*")) == before  # no event file added either
        assert "trainer.max_epochs=2" not in (run / ".hydra" / "overrides.yaml").read_text()
    # the failed attempts changed nothing: resuming as the run was configured still works
    assert bprun(f"trainer.resume={tmp_path}/onecycle").metrics["status"] == "completed"
