"""Sharded checkpoints (torch.distributed.checkpoint): under `trainer.strategy=fsdp` each rank
writes its own shards into `checkpoints/<name>/`, the folder appears whole or not at all, a
killed rank ends the job and `trainer.resume=` continues to the unbroken run's weights, and a
checkpoint saved on 2 ranks resumes on 1 (and 1 on 2). `task=export` makes one file of it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import BPRUN
from torch import nn

from bprun.engine import checkpoint as ckpt_io
from bprun.engine import sharded_checkpoint as sharded
from bprun.engine.distributed import SINGLE
from bprun.errors import BprunError

COMMON = [
    "dataset=digits", "model.hidden=[32,32]", "optim=adamw", "optim.impl=single",
    "trainer.max_epochs=2", "trainer.max_updates=100", "trainer.device=cpu", "trainer.threads=1",
    "trainer.progress=false", "trainer.log_every_n_updates=10",
    "trainer.checkpoint.every_n_updates=20",
]  # fmt: skip
FSDP = ["trainer.devices=2", "trainer.strategy=fsdp", "dataset.batch_size=8"]
ONE = ["trainer.devices=1", "trainer.strategy=ddp", "dataset.batch_size=16"]


def start(run_dir: Path, *args: str, data_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [BPRUN, f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}", *COMMON, *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=run_dir.parent,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def resume(run_dir: Path, *args: str) -> str:
    return finish(
        subprocess.Popen(
            [BPRUN, f"trainer.resume={run_dir}", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=run_dir.parent,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
    )


def final(run_dir: Path) -> dict:
    """The run's last checkpoint, consolidated in this process whatever its format."""
    return ckpt_io.load_checkpoint(ckpt_io.resolve_checkpoint(run_dir))


def assert_weights_close(got: dict, want: dict, atol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert torch.allclose(got[name], value, atol=atol), name


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, data_dir) -> Path:
    """100 updates on 2 ranks under FSDP (epoch 1 ends at 81), never stopped: what the resumed
    runs must reach."""
    run = tmp_path_factory.mktemp("sharded") / "unbroken"
    finish(start(run, *FSDP, data_dir=data_dir))
    return run


# --------------------------------------------------------------- in one process, no launch
def tiny(width: int = 8) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_a_sharded_checkpoint_loads_back_and_consolidates_like_a_pt_one(tmp_path):
    torch.manual_seed(0)
    model, optimizer = tiny()
    folder = sharded.save(tmp_path / "last", model, optimizer, {"progress": 1}, SINGLE)
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "state.pt"]

    fresh, fresh_optimizer = tiny()
    sharded.load(folder, fresh, fresh_optimizer)
    assert_weights_close(fresh.state_dict(), model.state_dict(), atol=0)
    for i, moments in optimizer.state_dict()["state"].items():
        for k, v in moments.items():
            assert torch.equal(fresh_optimizer.state_dict()["state"][i][k], v), (i, k)

    whole = ckpt_io.load_checkpoint(folder)  # as task=eval and a one-process resume read it
    assert whole["progress"] == 1
    assert_weights_close(whole["model"], model.state_dict(), atol=0)
    assert whole["optimizer"]["param_groups"][0]["params"] == [0, 1, 2, 3]
    assert torch.equal(whole["optimizer"]["state"][2]["exp_avg"], optimizer.state[model[2].weight]["exp_avg"])  # fmt: skip


def test_an_optimizer_without_state_loads_back_and_consolidates(tmp_path):
    """Plain SGD keeps no state per parameter: its checkpoint holds the groups alone."""
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    folder = sharded.save(tmp_path / "last", model, optimizer, {"progress": 1}, SINGLE)
    fresh = nn.Linear(4, 3)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.5)
    sharded.load(folder, fresh, fresh_optimizer)
    assert fresh_optimizer.param_groups[0]["lr"] == 0.1
    assert_weights_close(fresh.state_dict(), model.state_dict(), atol=0)
    whole = ckpt_io.load_checkpoint(folder)  # as task=export and task=eval read it
    assert whole["optimizer"] == {
        "state": {},
        "param_groups": optimizer.state_dict()["param_groups"],
    }


def test_a_save_killed_part_way_leaves_the_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    model, optimizer = tiny()
    sharded.save(run / "checkpoints" / "last", model, optimizer, {"progress": 1}, SINGLE)
    # killed while writing: a .tmp folder without its metadata, the previous one untouched
    (run / "checkpoints" / "last.tmp").mkdir()
    (run / "checkpoints" / "last.tmp" / "__0_0.distcp").write_bytes(b"torn")
    assert ckpt_io.resolve_checkpoint(run) == run / "checkpoints" / "last"
    # killed between its two renames: the previous checkpoint stepped aside to last.old
    (run / "checkpoints" / "last").rename(run / "checkpoints" / "last.old")
    found = ckpt_io.resolve_checkpoint(run)
    assert found == run / "checkpoints" / "last.old"
    assert_weights_close(ckpt_io.load_checkpoint(found)["model"], model.state_dict(), atol=0)
    # the next save writes afresh over what the killed one left
    sharded.save(run / "checkpoints" / "last", model, optimizer, {"progress": 2}, SINGLE)
    assert ckpt_io.resolve_checkpoint(run) == run / "checkpoints" / "last"
    assert not (run / "checkpoints" / "last.tmp").exists()
    assert ckpt_io.load_checkpoint(run / "checkpoints" / "last")["progress"] == 2


def test_a_checkpoint_that_does_not_fit_names_the_key_and_both_shapes(tmp_path):
    model, optimizer = tiny(width=8)
    folder = sharded.save(tmp_path / "last", model, optimizer, {}, SINGLE)
    other, other_optimizer = tiny(width=16)
    with pytest.raises(BprunError, match=r"0\.weight is \(8, 4\) in the checkpoint and \(16, 4\)"):
        sharded.load(folder, other, other_optimizer)


def test_an_export_of_a_run_without_checkpoints_is_one_line(bprun, tmp_path):
    (tmp_path / "empty").mkdir()
    r = bprun("task=export", f"ckpt={tmp_path / 'empty'}", check=False)
    errors = [line for line in r.output.splitlines() if "error" in line.lower()]
    assert r.returncode == 1 and "Traceback" not in r.output, r.output
    assert len(errors) == 1 and "has no checkpoints/last.pt" in errors[0], r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no run folder made


# --------------------------------------------------------------- 2 ranks under gloo
@pytest.mark.slow
def test_fsdp_checkpoints_are_folders_of_each_ranks_shards(unbroken):
    last = unbroken / "checkpoints" / "last"
    assert sorted(p.name for p in last.iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt",
    ]  # fmt: skip
    state = sharded.read_state(last)
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2
    assert state["progress"]["update"] == 100
    assert not list((unbroken / "checkpoints").glob("*.pt"))
    assert not list((unbroken / "checkpoints").glob("*.tmp"))


@pytest.mark.slow
def test_killed_rank_ends_the_job_and_resumes_on_two_and_on_one_rank(unbroken, tmp_path, data_dir):
    run = tmp_path / "run"
    proc = start(run, *FSDP, data_dir=data_dir)
    end = time.monotonic() + 240
    while not sharded.is_sharded(run / "checkpoints" / "last"):  # update 20's checkpoint
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < end, "no checkpoint appeared"
        time.sleep(0.02)
    ranks = children(proc.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[1], signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "rank 1 was killed by SIGKILL" in out, out[-3000:]
    saved = final(run)
    assert saved["progress"]["update"] in (20, 40, 60, 80)

    one = tmp_path / "one"  # the same checkpoint, resumed on one process: 2 -> 1
    shutil.copytree(run, one)
    out = resume(one, *ONE)
    assert f"resumed from {one / 'checkpoints' / 'last'}" in out
    assert_weights_close(final(one)["model"], final(unbroken)["model"])

    out = resume(run)  # on 2 ranks, as it ran: the unbroken run's weights
    assert "resumed from" in out
    resumed = final(run)
    assert resumed["progress"]["update"] == 100 and resumed["world_size"] == 2
    assert_weights_close(resumed["model"], final(unbroken)["model"])


@pytest.mark.slow
def test_a_one_process_sharded_checkpoint_resumes_on_two_ranks(unbroken, tmp_path, data_dir):
    run = tmp_path / "one"  # stopped at the end of epoch 1 (update 81)
    finish(start(run, *ONE, "trainer.checkpoint.format=dcp", "trainer.max_epochs=1", data_dir=data_dir))  # fmt: skip
    assert sorted(p.name for p in (run / "checkpoints" / "last").iterdir())[1:] == [
        "__0_0.distcp", "state.pt",
    ]  # fmt: skip
    out = resume(run, *FSDP, "trainer.max_epochs=2")
    assert "resumed from" in out
    assert_weights_close(final(run)["model"], final(unbroken)["model"])


@pytest.mark.slow
def test_export_makes_one_file_that_eval_and_init_from_take(unbroken, tmp_path, data_dir):
    from bprun.models.weights import read_state_dict

    run = tmp_path / "run"
    shutil.copytree(unbroken, run)
    tested = json.loads((run / "metrics.json").read_text())["test"]["test/acc"]
    base = [BPRUN, f"paths.data_dir={data_dir}", "trainer.threads=1", "trainer.progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for fmt in ("pt", "safetensors"):
        out = subprocess.run(
            [*base, "task=export", f"ckpt={run}", f"export.format={fmt}"],
            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
        exported = run / f"model.{fmt}"
        weights = read_state_dict(exported)  # as model.weights and model.init_from read it
        assert_weights_close(weights, ckpt_io.load_checkpoint(run / "checkpoints" / "last")["model"])  # fmt: skip
        out = subprocess.run(
            [*base, "task=eval", f"ckpt={exported}"],
            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
        evaluated = json.loads((run / "eval.json").read_text())["test/acc"]
        assert evaluated == pytest.approx(tested, abs=1e-6)
