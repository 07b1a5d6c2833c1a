"""The mistakes of a first hour with bprun: each caught before training, named, fixable
from its one line, and leaving no run folder behind."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BPRUN

from bprun.config import run_name
from bprun.diagnostics.gradcheck import ParamCheck, table


def bprun_in(cwd: Path, data_dir: Path, *args: str, timeout: float = 300):
    """The real command in `cwd`, run folders under cwd/outputs (Hydra's default naming)."""
    return subprocess.run(
        [BPRUN, f"paths.data_dir={data_dir}", "trainer.threads=1", "trainer.progress=false", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def run_folders(cwd: Path) -> list[Path]:
    return sorted(p for p in (cwd / "outputs").glob("*/*") if p.is_dir())


# (command line, what the one error line must say)
MISTAKES = [
    (["trainer.max_epoch=3"], "did you mean trainer.max_epochs?"),
    (["+trainer.max_epoch=3"], "did you mean trainer.max_epochs?"),
    (["trainer.early_stopping.patiense=3"], "did you mean trainer.early_stopping.patience?"),
    (["optim.lrr=3"], "did you mean optim.lr?"),
    (["seeds=3"], "did you mean seed"),
    (["dataset.batch_sise=32"], "did you mean dataset.batch_size"),
    (["model=cnnn"], "did you mean model=cnn?"),
    (["optim=adamm"], "did you mean optim=adam"),
    (["sched=cosin"], "did you mean sched=cosine?"),
    (["task=evaluate"], "did you mean task=eval?"),
    (["trainer.max_epochs=abc"], "trainer.max_epochs=abc"),
    (["trainer.max_epochs=0"], "trainer.max_epochs must be at least 1"),
    (["trainer.precision=fp16"], "trainer.precision='fp16' is not known"),
    (["trainer.precision=16-mixed"], "needs a CUDA device"),
    # refused before the data loads: the missing folder is never read
    (
        ["trainer.precision=16-mixed", "dataset=image_folder", "dataset.root=nowhere"],
        "needs a CUDA",
    ),
    (["trainer.device=cuda"], "CUDA is not available"),
    (["trainer.accumulate=0"], "trainer.accumulate must be at least 1"),
    (["trainer.mode=maximum"], "trainer.mode='maximum' is not known"),
    (["trainer.nonfinite=ignore"], "trainer.nonfinite='ignore' is not known"),
    (["trainer.grad_clip.algorithm=l2"], "trainer.grad_clip.algorithm='l2' is not known"),
    (["trainer.grad_clip.max=-1"], "trainer.grad_clip.max must be positive"),
    (["trainer.limit_train_batches=0"], "trainer.limit_train_batches must be positive"),
    (["trainer.monitor=val/accuracy"], "did you mean trainer.monitor=val/acc?"),
    (["trainer.checkpoint.monitor=val/los"], "did you mean trainer.checkpoint.monitor=val/loss?"),
    (
        ["trainer.early_stopping.patience=2", "trainer.early_stopping.monitor=val/ac"],
        "did you mean trainer.early_stopping.monitor=val/acc?",
    ),
    (["dataset.batch_size=0"], "dataset.batch_size must be a whole number of at least 1"),
    (["dataset.eval_batch_size=-5"], "dataset.eval_batch_size must be a whole number"),
    (["dataset.val_fraction=1.5"], "dataset.val_fraction must be in [0, 1)"),
    (["model.hidden=128"], "write model.hidden=[128]"),
    (["model=cnn", "model.channels=16"], "write model.channels=[16]"),
    (["model.init=kaiming"], "unknown model.init 'kaiming'"),
    (["loss=cross_entropy", "dataset=regression"], "use loss=mse, l1 or huber"),
    (["loss=mse"], "use loss=cross_entropy, nll or focal"),
    (["optim=lbfgs", "trainer.accumulate=2"], "cannot accumulate gradients"),
    (["sched=plateau", "sched.interval=step"], "set sched.interval=epoch"),
    (["task=eval"], "task=eval needs ckpt="),
    (["task=eval", "ckpt=nowhere"], "ckpt=nowhere: no such file or folder"),
    (["task=eval", "ckpt=notes.txt"], "is not a bprun checkpoint"),
    (["trainer.resume=nowhere"], "trainer.resume=nowhere: no such file or folder"),
]


@pytest.mark.parametrize("args, says", MISTAKES, ids=[" ".join(a) for a, _ in MISTAKES])
def test_a_mistake_is_one_line_and_leaves_no_run_folder(args, says, tmp_path, data_dir):
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    r = bprun_in(tmp_path, data_dir, *args)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    errors = [line for line in out.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, out
    assert says in errors[0], out
    assert "Traceback" not in out
    assert run_folders(tmp_path) == []


@pytest.mark.parametrize("dataset", ["regression", "timeseries"])
def test_the_loss_follows_the_dataset(dataset, bprun):
    r = bprun(f"dataset={dataset}", "trainer.max_epochs=1")
    m = r.metrics
    assert m["status"] == "completed"
    assert m["best"]["val/loss"] > 0 and "val/mae" in m["best"]  # mse, not cross-entropy
    assert "_target_: bprun.losses.auto" in (r.run_dir / ".hydra" / "config.yaml").read_text()


def test_a_finished_run_resumes_to_nothing_evaluates_beside_itself_and_trains_on(
    tmp_path, data_dir
):
    r = bprun_in(tmp_path, data_dir, "model=logreg", "trainer.max_epochs=1")
    assert r.returncode == 0, r.stderr
    (run,) = run_folders(tmp_path)
    # The folder is named by the overrides, and the name works on the command line as it is.
    assert run.name.endswith("_model:logreg+trainer.max_epochs:1")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "bprun.log"}

    again = bprun_in(tmp_path, data_dir, f"trainer.resume={run}")
    assert again.returncode == 0, again.stderr
    assert "is finished (epoch 1 of trainer.max_epochs=1); nothing to do" in again.stdout
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "bprun.log"}
    assert after == before  # metrics.json, checkpoints and event files untouched

    # Eval writes beside the checkpoint, in no new run folder, and takes another dataset.
    r = bprun_in(tmp_path, data_dir, "task=eval", f"ckpt={run}")
    assert r.returncode == 0, r.stderr
    (written,) = run.glob("checkpoints/eval.json")
    own = json.loads(written.read_text())
    assert run_folders(tmp_path) == [run]

    other = bprun_in(tmp_path, data_dir, "task=eval", f"ckpt={run}", "+dataset.seed=7")
    assert other.returncode == 0, other.stderr
    assert "evaluating the model trained on" in other.stdout
    assert json.loads(written.read_text())["test/loss"] != own["test/loss"]

    wrong = bprun_in(tmp_path, data_dir, "task=eval", f"ckpt={run}", "dataset=digits")
    assert wrong.returncode == 1 and "does not fit this dataset" in wrong.stderr + wrong.stdout
    assert run_folders(tmp_path) == [run]

    longer = bprun_in(tmp_path, data_dir, f"trainer.resume={run}", "trainer.max_epochs=2")
    assert longer.returncode == 0, longer.stderr
    m = json.loads((run / "metrics.json").read_text())
    assert m["epochs"] == 2 and m["status"] == "completed" and m["resumed_from"]


def test_own_files_in_the_data_dir_are_named_and_left_alone(tmp_path):
    mine = tmp_path / "photos"
    (mine / "cats").mkdir(parents=True)
    (mine / "cats" / "tom.png").write_bytes(b"\x89PNG not really")
    r = bprun_in(tmp_path, mine, "trainer.fast_dev_run=true")
    assert r.returncode == 0, r.stderr
    assert "holds files of your own (cats/tom.png" in r.stdout
    assert "dataset=image_folder" in r.stdout
    assert sorted(p.name for p in mine.iterdir()) == ["cats", "mnist1d"]  # the cache's own folder


@pytest.mark.parametrize(
    "signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGUSR1, 138)]
)
def test_a_signal_during_start_up_ends_with_a_message(signum, code, tmp_path, data_dir):
    proc = subprocess.Popen(
        [BPRUN, f"paths.data_dir={data_dir}", "trainer.threads=1"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    # As soon as bprun's handlers are in (its first step), still importing: long before training.
    mask = 1 << (signal.SIGTERM - 1)  # Python catches SIGINT itself; bprun adds SIGTERM
    status = Path(f"/proc/{proc.pid}/status")
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        caught = [line for line in status.read_text().splitlines() if line.startswith("SigCgt:")]
        if caught and int(caught[0].split()[1], 16) & mask:
            break
        time.sleep(0.01)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, out + err
    assert "Traceback" not in out + err
    said = "aborted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    assert said in out + err
    assert run_folders(tmp_path) == []


def test_help_lists_groups_tasks_and_the_users_own_options(tmp_path):
    mine = tmp_path / "my_conf" / "model"
    mine.mkdir(parents=True)
    (mine / "tiny.yaml").write_text("_target_: my_models.Tiny\n")
    out = subprocess.run(
        [BPRUN, "--help", f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "_schema" not in out
    for task in ("train", "eval", "gradcheck", "lr_find"):
        assert f"\n  {task} " in out
    (model_line,) = [line for line in out.splitlines() if line.strip().startswith("model:")]
    assert "cnn" in model_line and "tiny (file://" in model_line
    assert "loss:" in out and "auto" in out


def test_run_names_are_readable_and_safe_on_the_command_line():
    assert run_name("") == ""
    assert run_name("model:cnn+optim:adamw") == "_model:cnn+optim:adamw"
    assert run_name("dataset.root:/data/my imgs+model.hidden:[64,64]") == (
        "_dataset.root:_data_myimgs+model.hidden:64.64"
    )
    assert len(run_name("+".join(f"k{i}:{i}" for i in range(60)))) < 110


def test_lr_find_curve_starts_at_the_loss():
    """An untrained 3-class model starts near ln 3; the smoothed curve must start there too."""
    import torch
    from test_diagnostics import problem, trainer_for
    from torch import nn

    from bprun.data import InMemoryLoader
    from bprun.diagnostics.lr_find import find_lr
    from bprun.diagnostics.settings import LrFindSettings
    from bprun.engine import TrainerSettings

    torch.manual_seed(0)
    x, y = problem(n=256)
    model = nn.Sequential(nn.Linear(5, 3))
    with torch.no_grad():
        model[0].weight.mul_(0.01)
        model[0].bias.zero_()
        first = nn.functional.cross_entropy(model(x[:32]), y[:32]).item()
    trainer = trainer_for(model, TrainerSettings(progress=False))
    r = find_lr(trainer, InMemoryLoader(x, y, 32), LrFindSettings(num_steps=20, min_lr=1e-8))
    assert first == pytest.approx(math.log(3), rel=0.05)
    assert r.losses[0] == pytest.approx(first, rel=0.02)


def test_gradcheck_table_shows_the_autograd_column_only_when_it_ran():
    row = dict(name="w", shape=[2], checked=2, max_rel_error=1e-8, max_abs_error=0.0, kinks=0)
    row["passed"] = True
    assert "autograd.gradcheck" not in table([ParamCheck(**row, autograd_gradcheck=None)])
    shown = table([ParamCheck(**row, autograd_gradcheck=True)])
    assert "autograd.gradcheck" in shown and "passed" in shown
