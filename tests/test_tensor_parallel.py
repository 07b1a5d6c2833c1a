"""`trainer.strategy=fsdp_tp trainer.tp=2`: tensor parallelism over 2 CPU processes (gloo). Its
updates equal the one-process run's over the same global batches (clipping and accumulation
included), its checkpoints hold the plain model's full state, and bad settings are one line."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import BPRUN

from bprun.data.text import embedded_corpus
from bprun.engine import checkpoint as ckpt_io
from bprun.engine.checkpoint import load_model_state
from bprun.models.gpt import GPT

CPU = ["trainer.device=cpu", "trainer.threads=1", "trainer.progress=false"]
GPT_ARGS = [
    "experiment=char_gpt_cpu", "model.n_layer=2", "model.n_head=2", "model.n_embd=16",
    "dataset.block_size=16", "dataset.batch_size=4", "dataset.eval_batch_size=8",
    "trainer.val_batches=2", "trainer.max_updates=8", "trainer.val_every_n_updates=4",
    "trainer.accumulate=2", "trainer.log_every_n_updates=4", "trainer.grad_clip.max=0.05",
]  # fmt: skip
VIT = ["model=transformer", "model.dim=16", "model.heads=2", "model.depth=2"]
# SGD: the attention's key bias has a zero gradient (softmax ignores a shift of all of a
# query's scores) but for rounding noise, which Adam would scale up to whole steps
VIT_ARGS = [
    "dataset=digits", *VIT, "optim=sgd", "optim.momentum=0.9", "trainer.max_epochs=1", "trainer.limit_train_batches=8",
    "dataset.batch_size=16", "trainer.grad_clip.max=0.5", "trainer.log_every_n_updates=4",
]  # fmt: skip
TP = ["trainer.devices=2", "trainer.strategy=fsdp_tp", "trainer.tp=2"]


def bprun(run_dir: Path, *args: str, data_dir: Path, check: bool = True):
    proc = subprocess.run(
        [BPRUN, f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}", *CPU, *args],
        capture_output=True, text=True, timeout=300, cwd=run_dir.parent,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError((proc.stdout + proc.stderr)[-4000:])
    return proc


def last(run_dir: Path) -> dict:
    """The run's last checkpoint (under TP a sharded folder), consolidated here."""
    return ckpt_io.load_checkpoint(ckpt_io.resolve_checkpoint(run_dir))


def assert_same_weights(tp_run: Path, one_run: Path) -> None:
    split, one = last(tp_run), last(one_run)
    assert split["model"].keys() == one["model"].keys()  # the plain model's names, in full
    for name, value in one["model"].items():
        assert split["model"][name].shape == value.shape, name
        assert torch.allclose(split["model"][name], value, atol=1e-5), name
    for key, moments in one["optimizer"]["state"].items():  # the moments, gathered
        for k, v in moments.items():
            assert torch.allclose(split["optimizer"]["state"][key][k], v, atol=1e-5), (key, k)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(embedded_corpus()[:20000], encoding="utf-8")
    return path


@pytest.mark.slow
def test_the_gpt_split_over_two_ranks_trains_as_one_process_does(corpus, tmp_path, data_dir):
    runs = {"tp": tmp_path / "tp", "one": tmp_path / "one"}
    proc = bprun(runs["tp"], *GPT_ARGS, f"dataset.path={corpus}", *TP, data_dir=data_dir)
    assert "tensor parallel: 6 layer pattern(s) split over 2 ranks" in proc.stdout + proc.stderr
    bprun(runs["one"], *GPT_ARGS, f"dataset.path={corpus}", data_dir=data_dir)
    assert_same_weights(runs["tp"], runs["one"])
    m = json.loads((runs["tp"] / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["updates"] == 8
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for run in runs.values():  # the split model's text sample, every rank sampling in step
        tb = EventAccumulator(str(run), size_guidance={"tensors": 0})
        tb.Reload()
        samples = tb.Tensors("sample/text_summary")
        assert [e.step for e in samples] == [4, 8]
        assert len(samples[-1].tensor_proto.string_val[0]) > 200
    # the checkpoint is a plain GPT's: one process loads it and computes what the run did
    model = GPT(input_shape=(16,), num_classes=last(runs["one"])["model"]["wte.weight"].shape[0],
                n_layer=2, n_head=2, n_embd=16)  # fmt: skip
    load_model_state(model, last(runs["tp"])["model"], "last.pt")


@pytest.mark.slow
def test_the_transformer_split_over_two_ranks_trains_as_one_process_does(tmp_path, data_dir):
    runs = {"tp": tmp_path / "tp", "one": tmp_path / "one"}
    bprun(runs["tp"], *VIT_ARGS, *TP, data_dir=data_dir)
    bprun(runs["one"], *VIT_ARGS, data_dir=data_dir)
    assert_same_weights(runs["tp"], runs["one"])
    m = json.loads((runs["tp"] / "metrics.json").read_text())
    m1 = json.loads((runs["one"] / "metrics.json").read_text())
    assert m["test"]["test/acc"] == pytest.approx(m1["test"]["test/acc"], abs=1e-4)
    # task=eval reads the 2-rank checkpoint in one process
    bprun(tmp_path / "ev", "task=eval", f"ckpt={runs['tp']}", data_dir=data_dir)
    ev = json.loads((runs["tp"] / "checkpoints" / "eval.json").read_text())
    assert ev["test/acc"] == pytest.approx(m["test"]["test/acc"], abs=1e-6)


@pytest.mark.parametrize(
    "args, says",
    [
        (["trainer.tp=2"], "trainer.strategy=ddp does not do: set trainer.strategy=fsdp_tp"),
        (["trainer.strategy=fsdp_tp", "trainer.tp=2"], "does not divide trainer.devices=1"),
        (["trainer.strategy=fsdp_tp", "trainer.tp=2", "trainer.devices=3"], "multiple of it"),
        (["trainer.strategy=fsdp_tp", "trainer.devices=2"], "set trainer.tp=2 or more"),
        ([*TP, "model.heads=3", "model.dim=12"], "trainer.tp=2 does not divide model.heads=3"),
        (
            [*TP, "model=mlp"],
            "MLP has no tensor-parallel plan (model=gpt and model=transformer have one)",
        ),
        ([*TP, "model.mlp_ratio=1.5625"], "trainer.tp=2 does not divide the MLP width=25"),
    ],
)
def test_bad_tensor_parallel_settings_are_one_line(args, says, tmp_path, data_dir):
    base = [a for a in VIT_ARGS if "model=mlp" not in args or a not in VIT]
    proc = bprun(tmp_path / "run", *base, *args, data_dir=data_dir, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out, out
    errors = [line for line in out.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and says in errors[0], out
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_the_gpt_loads_checkpoints_of_its_fused_qkv_layout():
    torch.manual_seed(0)
    model = GPT(input_shape=(8,), num_classes=11, n_layer=1, n_head=2, n_embd=8, bias=True)
    state = model.state_dict()
    fused = dict(state)
    attn = "blocks.0.attn."
    for kind in ("weight", "bias"):  # the layout of checkpoints written before the split
        parts = [fused.pop(f"{attn}{n}.{kind}") for n in "qkv"]
        fused[f"{attn}qkv.{kind}"] = torch.cat(parts)
    other = GPT(input_shape=(8,), num_classes=11, n_layer=1, n_head=2, n_embd=8, bias=True)
    load_model_state(other, fused, "old.pt")
    for name, value in state.items():
        assert torch.equal(other.state_dict()[name], value), name
    x = torch.randint(0, 11, (2, 8))
    assert torch.equal(other(x), model(x))


def test_the_transformer_computes_what_torchs_encoder_did_and_loads_its_checkpoints():
    from bprun.models.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(input_shape=(1, 40), num_classes=3, dim=16, heads=4, depth=2)
    layer = torch.nn.TransformerEncoderLayer(
        16, 4, dim_feedforward=32, activation=torch.nn.GELU(), batch_first=True, norm_first=True
    )
    torch_encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    old = {f"encoder.{k}": v for k, v in torch_encoder.state_dict().items()}
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    load_model_state(model, {**old, **rest}, "old.pt")  # the layout of earlier checkpoints
    x = torch.randn(5, 40, 16)
    assert torch.allclose(model.encoder(x), torch_encoder.eval()(x), atol=1e-6)
