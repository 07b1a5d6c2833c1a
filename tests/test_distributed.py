"""`trainer.devices=2`: DistributedDataParallel over 2 CPU processes (gloo).

The runs share one small set-up (a 32-unit MLP on sklearn's digits, SGD, 3
epochs of ~100 updates each, an EMA of the weights) so the suite pays for few
launches.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import BPRUN

pytestmark = pytest.mark.slow

COMMON = [
    "dataset=digits",
    "model.hidden=[32]",
    "optim=sgd",
    "trainer.max_epochs=3",
    "trainer.device=cpu",
    "trainer.threads=1",
    "trainer.progress=false",
    "trainer.log_every_n_updates=10",
    "trainer.checkpoint.every_n_updates=20",
    "trainer.ema.decay=0.9",  # each rank keeps the average of the weights they share
]
DDP = ["trainer.devices=2", "dataset.batch_size=8", "dataset.eval_batch_size=50"]
ONE = ["dataset.batch_size=16", "dataset.eval_batch_size=100"]


def start(run_dir: Path, *args: str, data_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [BPRUN, f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}", *COMMON, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=run_dir.parent,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def weights(run_dir: Path) -> dict:
    """The model's weights and, as `ema.<name>`, the EMA's, from the run's last.pt."""
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    ema = state["callbacks"]["averaging"]["weights"]
    return {**state["model"], **{f"ema.{k}": v for k, v in ema.items()}}


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted 2-rank run and the one-process run with the same global batch."""
    root = tmp_path_factory.mktemp("ddp")
    data = root / "data"
    runs = {"ddp": root / "ddp", "one": root / "one"}
    code, out = finish(start(runs["ddp"], *DDP, data_dir=data))
    assert code == 0, out[-3000:]
    code, out = finish(start(runs["one"], *ONE, data_dir=data))
    assert code == 0, out[-3000:]
    return runs


def test_two_ranks_train_like_one_process(reference):
    ddp, one = weights(reference["ddp"]), weights(reference["one"])
    for name in one:
        assert torch.allclose(ddp[name], one[name], atol=1e-6), name
    # One run folder with one event file and one metrics.json: the ranks never composed.
    folder = reference["ddp"]
    assert {p.name for p in folder.parent.iterdir()} - {"data"} == {"ddp", "one"}
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1
    m_ddp = json.loads((folder / "metrics.json").read_text())
    m_one = json.loads((reference["one"] / "metrics.json").read_text())
    assert m_ddp["world_size"] == 2 and m_ddp["updates"] == m_one["updates"] > 200
    # Validation and test metrics are reduced over the ranks: every sample counted once.
    for key in ("test/acc", "test/loss"):
        assert m_ddp["test"][key] == pytest.approx(m_one["test"][key], abs=1e-5)
    for key in ("val/acc", "val_ema/acc", "val_ema/loss"):
        assert m_ddp["best"][key] == pytest.approx(m_one["best"][key], abs=1e-5)


def test_two_ranks_streaming_train_like_one_process(reference, tmp_path):
    """The streaming path shards the same seeded order: DataLoader workers on each rank, and
    the one-process in-memory run's weights at the end."""
    run = tmp_path / "stream"
    args = [*DDP, "dataset.loader=stream", "dataset.num_workers=1"]
    code, out = finish(start(run, *args, data_dir=reference["one"].parent / "data"))
    assert code == 0, out[-3000:]
    assert "stream" in out
    one = weights(reference["one"])
    for name, value in weights(run).items():
        assert torch.allclose(value, one[name], atol=1e-6), name


def test_killed_rank_ends_the_job_and_resume_matches(reference, tmp_path):
    run = tmp_path / "run"
    proc = start(run, *DDP, data_dir=reference["ddp"].parent / "data")
    wait_for(run / "checkpoints" / "last.pt", proc)
    ranks = children(proc.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[1], signal.SIGKILL)
    code, out = finish(proc, timeout=60)  # bounded: the peers fail on the closed connection
    assert code != 0
    assert "killed by SIGKILL" in out
    assert not any(alive(r) for r in ranks)
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["progress"]["update"]

    proc = subprocess.Popen(
        [BPRUN, f"trainer.resume={run}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    code, out = finish(proc)
    assert code == 0, out[-3000:]
    assert "resumed from" in out
    resumed, uninterrupted = weights(run), weights(reference["ddp"])
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name


def test_killed_launcher_ends_every_rank(data_dir, tmp_path):
    run = tmp_path / "run"
    proc = start(run, *DDP, "trainer.max_epochs=50", data_dir=data_dir)
    wait_for(run / "checkpoints" / "last.pt", proc)
    ranks = children(proc.pid)
    assert len(ranks) == 2, ranks
    proc.kill()
    proc.wait()
    end = time.monotonic() + 60
    while any(alive(r) for r in ranks):
        assert time.monotonic() < end, "ranks outlived their launcher"
        time.sleep(0.1)
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


def test_torchrun_of_bprun_makes_one_run_folder(data_dir, tmp_path):
    """`torchrun -m bprun` (the multi-node form, here on one node): rank 0 composes, the
    other rank runs its frozen config, and there is one run folder."""
    port = 29400 + os.getpid() % 500
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            "--nproc-per-node=2",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            "-m",
            "bprun",
            f"paths.data_dir={data_dir}",
            f"paths.output_dir={tmp_path / 'outputs'}",
            *COMMON,
            *DDP[1:],
            "trainer.max_epochs=1",
            "trainer.max_updates=20",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    runs = [p.parent for p in (tmp_path / "outputs").rglob("frozen_config.yaml")]
    assert len(runs) == 1 and len(list((tmp_path / "outputs").rglob("metrics.json"))) == 1
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["updates"] == 20


def test_sigterm_to_the_launcher_checkpoints_and_stops_every_rank(data_dir, tmp_path):
    run = tmp_path / "run"
    proc = start(run, *DDP, "trainer.max_epochs=50", data_dir=data_dir)
    wait_for(run / "checkpoints" / "last.pt", proc)
    ranks = children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc, timeout=90)
    assert code == 143, out[-3000:]
    assert f"Resume with:\n  bprun trainer.resume={run}" in out
    assert not any(alive(r) for r in ranks)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert len(state["rng_ranks"]) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["task=lr_find"], "trainer.devices=2 runs task=train only"),
        (["optim=lbfgs"], "optim=lbfgs re-evaluates each rank's own loss"),
        (
            ["trainer.sync_batchnorm=true", "model.norm=batch"],
            "trainer.sync_batchnorm=true needs CUDA",
        ),
    ],
)
def test_refused_before_any_rank_starts(bprun, args, message):
    r = bprun("trainer.devices=2", "trainer.device=cpu", *args, check=False)
    assert r.returncode == 1 and f"error: {message}" in r.output
    assert "Traceback" not in r.output and "starting 2 ranks" not in r.output


def test_kfac_two_ranks_train_like_one_process(bprun, tmp_path):
    """K-FAC's factors are all-reduced: two ranks on half batches end on the weights of one
    process on the whole batch (the factors' means over the ranks are the global batch's)."""
    args = ["dataset=digits", "model.hidden=[32]", "optim=kfac", "trainer.max_epochs=1"]
    ddp = bprun(*args, *DDP, f"hydra.run.dir={tmp_path}/ddp")
    one = bprun(*args, *ONE, f"hydra.run.dir={tmp_path}/one")
    assert "K-FAC preconditions 2 layers" in ddp.output
    saved = {
        name: torch.load(run.run_dir / "checkpoints" / "last.pt", weights_only=True)
        for name, run in (("ddp", ddp), ("one", one))
    }
    assert saved["ddp"]["progress"]["update"] == saved["one"]["progress"]["update"] > 80
    for name, value in saved["one"]["model"].items():
        torch.testing.assert_close(saved["ddp"]["model"][name], value, rtol=1e-4, atol=1e-5)
