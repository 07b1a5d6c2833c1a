"""`trainer.strategy=fsdp`: FSDP2 over 2 CPU processes (gloo). Its updates equal the one-process
run's over the same global batches (accumulation and clipping included), its checkpoints hold
the full state and resume on another number of ranks, and task=eval reads them in one process."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import BPRUN
from torch import nn

from bprun.engine import checkpoint as ckpt_io
from bprun.engine.fsdp import repeated_blocks, shard_units
from bprun.errors import BprunError

COMMON = [
    "dataset=digits", "model.hidden=[32,32]", "optim=adamw", "trainer.max_epochs=2",
    "trainer.device=cpu", "trainer.threads=1", "trainer.progress=false",
    "trainer.accumulate=2", "trainer.grad_clip.max=0.5", "trainer.log_every_n_updates=10",
]  # fmt: skip
FSDP = ["trainer.devices=2", "trainer.strategy=fsdp", "dataset.batch_size=8"]
ONE = ["dataset.batch_size=16"]


def bprun(run_dir: Path, *args: str, data_dir: Path, check: bool = True, common=COMMON):
    proc = subprocess.run(
        [BPRUN, f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}", *common, *args],
        capture_output=True, text=True, timeout=300, cwd=run_dir.parent,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError((proc.stdout + proc.stderr)[-4000:])
    return proc


def state(run_dir: Path) -> dict:
    """The run's last checkpoint (under FSDP a sharded folder), consolidated here."""
    return ckpt_io.load_checkpoint(ckpt_io.resolve_checkpoint(run_dir))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp")
    found = {"fsdp": root / "fsdp", "one": root / "one"}
    ema = "trainer.ema.decay=0.9"  # an average of the weights, sharded like them under FSDP
    bprun(found["fsdp"], *FSDP, ema, data_dir=data_dir)
    bprun(found["one"], *ONE, ema, data_dir=data_dir)
    return found


@pytest.mark.slow
def test_sharded_training_equals_one_process_over_the_same_global_batches(runs):
    sharded, one = state(runs["fsdp"]), state(runs["one"])
    assert sharded["model"].keys() == one["model"].keys()  # the plain model's names
    for name, value in one["model"].items():
        assert torch.allclose(sharded["model"][name], value, atol=1e-5), name
    for key, moments in one["optimizer"]["state"].items():  # Adam's moments, gathered in full
        for k, v in moments.items():
            assert torch.allclose(sharded["optimizer"]["state"][key][k], v, atol=1e-5), (key, k)
    averaged, averaged_one = (s["callbacks"]["averaging"] for s in (sharded, one))
    assert averaged["count"] == averaged_one["count"] > 0
    assert averaged["weights"].keys() == averaged_one["weights"].keys()
    for name, value in averaged_one["weights"].items():  # the EMA, gathered from the shards
        assert torch.allclose(averaged["weights"][name], value, atol=1e-5), name
    m = json.loads((runs["fsdp"] / "metrics.json").read_text())
    m1 = json.loads((runs["one"] / "metrics.json").read_text())
    assert "val_ema/acc" in m["best"] or "val_ema/acc" in json.dumps(m)
    assert m["world_size"] == 2 and m["updates"] == m1["updates"]
    assert m["test"]["test/acc"] == pytest.approx(m1["test"]["test/acc"], abs=1e-4)


@pytest.mark.slow
def test_gradients_are_averaged_over_the_ranks_not_summed(tmp_path, data_dir):
    """Plain SGD without clipping: a step scales with the gradient, so a reduce-scatter that
    summed where it should average (reported for FSDP2 under gloo, pytorch#162338) would
    double every step. Adam and clipping hide a gradient's scale; this run has neither."""
    sgd = ["dataset=digits", "model.hidden=[32,32]", "optim=sgd", "optim.lr=0.2",
           "trainer.max_updates=10", "trainer.device=cpu", "trainer.threads=1",
           "trainer.progress=false"]  # fmt: skip
    bprun(tmp_path / "fsdp", *FSDP, data_dir=data_dir, common=sgd)
    bprun(tmp_path / "one", *ONE, data_dir=data_dir, common=sgd)
    sharded, one = state(tmp_path / "fsdp"), state(tmp_path / "one")
    assert sharded["progress"]["update"] == one["progress"]["update"] == 10
    for name, value in one["model"].items():
        assert torch.allclose(sharded["model"][name], value, atol=1e-6), name


@pytest.mark.slow
def test_sharded_training_with_batchnorm_and_clipping_equals_ddp(tmp_path, data_dir):
    """BatchNorm normalises each rank's half-batch, under DDP as under FSDP, so DDP at 2 ranks
    is the reference, with clipping on every update. Running statistics that followed each
    rank's own data would show in the validation, where each rank scores its part with its
    own. Both step with AdamW's single-tensor kernel, the one FSDP's sharded parameters take
    on the CPU: DDP's default, the fused kernel, differs from it in the last bit, and Adam
    turns that into whole steps where a gradient is near zero (the clipping factor's bits
    are tested in test_engine)."""
    cnn = [*COMMON[3:], "dataset=digits", "model=cnn", "model.channels=[8,16]",
           "model.dropout=0.0", "optim=adamw", "optim.impl=single",
           "trainer.grad_clip.max=0.1", "trainer.max_epochs=1", "trainer.devices=2",
           "dataset.batch_size=8"]  # fmt: skip
    bprun(tmp_path / "fsdp", "trainer.strategy=fsdp", data_dir=data_dir, common=cnn)
    bprun(tmp_path / "ddp", "trainer.strategy=ddp", data_dir=data_dir, common=cnn)
    sharded, ddp = state(tmp_path / "fsdp"), state(tmp_path / "ddp")
    assert ddp["progress"]["update"] == sharded["progress"]["update"] > 30
    stats = [k for k in ddp["model"] if "running" in k]
    assert stats  # the running statistics are compared too, not only the weights
    for name, value in ddp["model"].items():
        assert torch.allclose(sharded["model"][name].float(), value.float(), atol=1e-6), name
    # each rank validates its part with its own statistics: rank 0's, as under DDP
    final = [
        json.loads((tmp_path / s / "metrics.json").read_text())["final"] for s in ("fsdp", "ddp")
    ]
    assert final[0]["val/loss"] == pytest.approx(final[1]["val/loss"], abs=1e-6)


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_on_one_process_and_evaluates(runs, tmp_path, data_dir):
    run = tmp_path / "more"
    # a third epoch, on one process, from the 2-rank sharded run's checkpoint
    import shutil

    shutil.copytree(runs["fsdp"], run)
    bprun(
        tmp_path / "x", f"trainer.resume={run}", "trainer.max_epochs=3", *ONE,
        "trainer.devices=1", "trainer.strategy=ddp", "optim.impl=single", data_dir=data_dir,
    )  # fmt: skip
    after = state(run)
    assert after["progress"]["epoch"] == 3 and after["world_size"] == 1
    # the same third epoch on 2 ranks: the gathered EMA is sharded back and averages on
    again = tmp_path / "again"
    shutil.copytree(runs["fsdp"], again)
    bprun(tmp_path / "z", f"trainer.resume={again}", "trainer.max_epochs=3", *FSDP,
          data_dir=data_dir)  # fmt: skip
    two = state(again)["callbacks"]["averaging"]
    assert two["count"] == after["callbacks"]["averaging"]["count"]
    for name, value in after["callbacks"]["averaging"]["weights"].items():
        assert torch.allclose(two["weights"][name], value, atol=1e-5), name
    proc = bprun(tmp_path / "y", "task=eval", f"ckpt={runs['fsdp']}", data_dir=data_dir)
    ev = json.loads(next((runs["fsdp"] / "checkpoints").glob("eval.json")).read_text())
    m = json.loads((runs["fsdp"] / "metrics.json").read_text())
    assert ev["test/acc"] == pytest.approx(m["test"]["test/acc"], abs=1e-6), proc.stdout


def test_repeated_blocks_are_the_shard_units():
    from bprun.models.mlp import MLP
    from bprun.models.transformer import Transformer

    mlp = MLP(input_shape=(8,), num_classes=3, hidden=[16, 16, 16])
    assert repeated_blocks(mlp) == ["blocks.0", "blocks.1", "blocks.2"]
    vit = Transformer(input_shape=(1, 40), num_classes=3, depth=2)
    assert repeated_blocks(vit) == ["encoder.layers.0", "encoder.layers.1"]
    assert shard_units(vit, ["encoder.layers.*"]) == ["encoder.layers.0", "encoder.layers.1"]
    nested = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2)))
    assert repeated_blocks(nested) == ["0", "1"]
    with pytest.raises(BprunError, match=r"model.shard_units=\['nope\.\*'\] names no module"):
        shard_units(vit, ["nope.*"])


@pytest.mark.parametrize(
    "args, says",
    [
        (["trainer.strategy=fsdp"], "trainer.strategy=fsdp shards the model over ranks"),
        (
            [
                "trainer.strategy=fsdp",
                "trainer.devices=2",
                "trainer.ema.decay=0.9",
                "trainer.ema.device=cpu",
            ],
            "trainer.ema.device=cpu is not supported",
        ),  # fmt: skip
        (["trainer.strategy=fdsp"], "trainer.strategy='fdsp' is not known"),
    ],
)
def test_bad_strategy_settings_are_one_line(args, says, tmp_path, data_dir):
    proc = bprun(tmp_path / "run", *args, data_dir=data_dir, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out, out
    errors = [line for line in out.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and says in errors[0], out
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_a_rank_holds_half_of_the_state_under_fsdp_at_two_ranks():
    from types import SimpleNamespace

    from bprun.bench.fsdp import main

    gpt = "gpt model.n_layer=2 model.n_embd=64 model.n_head=2"  # with GPT-2's vocabulary
    table = main(SimpleNamespace(ranks="2", model=gpt))
    ddp, fsdp = table[("ddp", 2)], table[("fsdp", 2)]
    assert ddp["optimizer"] >= 2 * ddp["parameters"]  # AdamW's two moments, whole on every rank
    assert fsdp["total"] <= 1.1 / 2 * ddp["total"]
    assert fsdp["gradients"] == fsdp["parameters"]  # gradients sharded like the parameters


@pytest.mark.slow
def test_activation_checkpointing_under_fsdp_changes_no_weight(runs, tmp_path, data_dir):
    """Each block recomputed in the backward, inside its FSDP unit: the same updates."""
    run = tmp_path / "ac"
    bprun(run, *FSDP, "trainer.ema.decay=0.9", "model.activation_checkpointing=true",
          data_dir=data_dir)  # fmt: skip
    recomputed, plain = state(run)["model"], state(runs["fsdp"])["model"]
    for name, value in plain.items():
        assert torch.allclose(recomputed[name], value, atol=1e-6), name


@pytest.mark.slow
def test_sigterm_under_fsdp_saves_a_sharded_checkpoint_that_resumes(tmp_path, data_dir):
    import signal
    import time

    run = tmp_path / "run"
    args = [*FSDP, "trainer.max_epochs=40", "trainer.checkpoint.every_n_updates=5"]
    proc = subprocess.Popen(
        [BPRUN, f"paths.data_dir={data_dir}", f"hydra.run.dir={run}", *COMMON, *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    end = time.monotonic() + 240
    while not (run / "checkpoints" / "last" / ".metadata").exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < end, "no sharded checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    assert f"bprun trainer.resume={run}" in out
    stopped = state(run)["progress"]["update"]
    bprun(tmp_path / "again", f"trainer.resume={run}", *FSDP, "trainer.max_epochs=3",
          data_dir=data_dir)  # fmt: skip
    resumed = state(run)
    assert resumed["progress"]["epoch"] == 3 and resumed["progress"]["update"] > stopped


@pytest.mark.slow
def test_a_sweep_of_fsdp_jobs_with_early_stopping(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [BPRUN, "-m", f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep}", *COMMON, *FSDP,
         "optim.lr=0.003,0.01", "trainer.max_epochs=30", "trainer.early_stopping.patience=1",
         "trainer.early_stopping.min_delta=0.5"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "2 ok, 0 not ok" in out, out[-3000:]
    for job in sorted(p for p in sweep.iterdir() if p.is_dir()):
        m = json.loads((job / "metrics.json").read_text())
        assert m["world_size"] == 2 and "early stopping" in m["stop_reason"], m["stop_reason"]
        assert m["epochs"] < 30
