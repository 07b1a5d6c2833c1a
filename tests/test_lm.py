"""Language models: dataset=text, model=gpt, problem=lm, task=generate."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BPRUN
from test_checkpoint import model_state, saved_update, start, wait_for_update

from bprun.data.text import embedded_corpus
from bprun.data.windows import WindowLoader
from bprun.models.gpt import GPT

TINY = [
    "experiment=char_gpt_cpu",
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=16",
    "dataset.block_size=16",
    "dataset.batch_size=4",
    "dataset.eval_batch_size=8",
    "trainer.val_batches=2",
    "trainer.log_every_n_updates=10",
]


def corpus(tmp_path: Path, chars: int = 20000) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(embedded_corpus()[:chars], encoding="utf-8")
    return path


# ---------------------------------------------------------------- units
def test_windows_are_seeded_by_position_and_ranks_split_them():
    tokens = np.arange(1000, dtype=np.uint16)
    one = WindowLoader(tokens, 8, 6, seed=3, num_batches=4)
    x, y = one.batch(1, 2)
    assert torch.equal(x, one.batch(1, 2)[0])  # the same (epoch, batch): the same windows
    assert not torch.equal(x, one.batch(2, 2)[0])
    assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the inputs shifted by one
    # dataset.batch_size is per rank: 2 ranks of 3 draw the windows of one process of 6
    shares = [WindowLoader(tokens, 8, 3, seed=3, num_batches=4).shard(r, 2) for r in (0, 1)]
    a, b = (s.batch(1, 2)[0] for s in shares)
    assert len(a) == len(b) == 3 and len(shares[0]) == 4
    assert torch.equal(torch.cat([a, b]), x)  # the ranks' windows are the global batch's
    seq = WindowLoader(tokens, 8, 50, mode="sequential")
    starts = torch.cat([x[:, 0] for x, _ in seq.batches()])
    assert torch.equal(starts, torch.arange(0, 999 - 7, 8)[: len(starts)])


@pytest.mark.parametrize("rope", [False, True])
def test_kv_cache_generates_what_recomputing_does(rope):
    torch.manual_seed(0)
    model = GPT((32,), 50, n_layer=2, n_head=2, n_embd=16, rope=rope).eval()
    prompt = torch.randint(0, 50, (2, 5))
    # the cache's logits, one position at a time, are those of the whole sequence at once
    seq = torch.randint(0, 50, (2, 12))
    caches = model.new_cache(2, "cpu", torch.float32)
    steps = [model(seq[:, :5], caches, 0)]
    steps += [model(seq[:, p : p + 1], caches, p) for p in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), model(seq), atol=1e-5, rtol=1e-4)
    cached = model.generate(prompt, 20, temperature=0)
    full = model.generate(prompt, 20, temperature=0, use_cache=False)
    assert torch.equal(cached, full)
    g1, g2 = (torch.Generator().manual_seed(7) for _ in range(2))
    a = model.generate(prompt, 20, temperature=1.0, top_k=10, top_p=0.9, generator=g1)
    b = model.generate(
        prompt, 20, temperature=1.0, top_k=10, top_p=0.9, generator=g2, use_cache=False
    )
    assert torch.equal(a, b)


def test_gpt_layout_and_initialisation():
    model = GPT((16,), 40, n_layer=4, n_head=2, n_embd=32)
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == 4
    assert model.lm_head.weight is model.wte.weight  # tied
    std = model.blocks[0].mlp.proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(8)) < 0.002  # residual projections scaled
    from bprun.optim import param_groups

    groups = param_groups(model, 1e-3, 0.1, split_decay=True)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.wte.weight) in no_decay and id(model.wpe.weight) in no_decay
    assert id(model.blocks[0].ln_1.weight) in no_decay
    assert id(model.blocks[0].attn.q.weight) not in no_decay


# ---------------------------------------------------------------- end to end
def test_train_metrics_tokenizer_and_generate(bprun, tmp_path):
    path = corpus(tmp_path)
    r = bprun(
        *TINY, f"dataset.path={path}", "trainer.max_updates=40", "trainer.val_every_n_updates=20"
    )
    m = r.metrics
    checks = [h for h in m["history"] if "val/loss" in h]
    assert [h["update"] for h in checks] == [20, 40]
    last = checks[-1]
    assert last["val/ppl"] == pytest.approx(math.exp(last["val/loss"]))
    text = path.read_text()
    val_text = text[len(text) - int(len(text) * 0.1) :]
    tokens_per_byte = len(val_text) / len(val_text.encode())  # char tokens
    assert last["val/bpb"] == pytest.approx(last["val/loss"] / math.log(2) * tokens_per_byte)
    assert last["throughput/tokens_per_s"] > 0
    assert "tokens/s" in r.output
    saved = json.loads((r.run_dir / "tokenizer.json").read_text())
    assert saved["kind"] == "char" and set(saved["chars"]) == set(text[: len(text) - len(val_text)])
    ckpt = torch.load(r.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["extra"]["data"]["tokenizer"] == saved

    g = bprun(
        "task=generate",
        f"ckpt={r.run_dir}",
        "generate.max_new_tokens=30",
        "generate.num_samples=2",
        "generate.prompt=The",
    )
    samples = (r.run_dir / "samples.txt").read_text()
    assert samples.count("The") >= 2 and "---------------" in samples
    assert samples.splitlines()[0] in g.stdout
    bad = bprun("task=generate", f"ckpt={r.run_dir}", "generate.prompt='héllo ☃'", check=False)
    assert bad.returncode != 0
    assert "error:" in bad.output and "☃" in bad.output and "never saw" in bad.output


def test_generate_refuses_a_run_that_is_not_a_language_model(bprun):
    r = bprun("model=logreg", "trainer.max_epochs=1")
    g = bprun("task=generate", f"ckpt={r.run_dir}", check=False)
    assert g.returncode != 0
    assert "error: task=generate samples from a language model" in g.output


def bad_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.txt"
    if kind == "empty":
        path.write_text("")
    elif kind == "binary":
        path.write_bytes(b"some text\x00\x01\x02")
    else:
        path.write_bytes(b"plain text, then \xe9t\xe9")
    return path


@pytest.mark.parametrize(
    "case, args, says",
    [
        ("empty", [], "is empty"),
        ("binary", [], "a NUL byte at offset 9"),
        ("latin1", [], "byte offset 17"),
        (
            "short_val",
            ["dataset.block_size=200", "dataset.val_fraction=0.01"],
            "the validation split holds",
        ),
        (
            "vocab",
            ["dataset.tokenizer=bpe", "dataset.vocab_size=100"],
            "dataset.vocab_size=100 is below the byte alphabet",
        ),
        ("positions", ["model.block_size=8"], "dataset.block_size=16 is larger than the model"),
    ],
)
def test_bad_text_input_is_one_error_line(bprun, tmp_path, case, args, says):
    path = bad_file(tmp_path, case) if case in ("empty", "binary", "latin1") else corpus(tmp_path)
    r = bprun(*TINY, f"dataset.path={path}", "trainer.max_updates=2", *args, check=False)
    assert r.returncode != 0
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and says in lines[0], r.output
    if case in ("empty", "binary", "latin1"):
        assert str(path) in lines[0]
    assert not (r.run_dir / "checkpoints").exists()


def test_gpt2_encoding_offline_names_the_file(bprun, tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty_cache"))
    r = bprun(*TINY, "dataset.tokenizer=gpt2", "trainer.max_updates=2", check=False)
    assert r.returncode != 0
    assert "vocab.bpe" in r.output and str(tmp_path / "empty_cache") in r.output


@pytest.mark.slow
def test_bpe_tokenizer_trains_and_is_reused_from_the_cache(bprun, tmp_path, data_dir):
    path = corpus(tmp_path)
    args = [*TINY, f"dataset.path={path}", "dataset.tokenizer=bpe", "dataset.vocab_size=300"]
    first = bprun(*args, "trainer.max_updates=4", f"hydra.run.dir={tmp_path}/a")
    assert "encoded" in first.output
    tok = json.loads((first.run_dir / "tokenizer.json").read_text())
    assert tok["model"]["type"] == "BPE" and len(tok["model"]["vocab"]) == 300
    second = bprun(*args, "trainer.max_updates=4", f"hydra.run.dir={tmp_path}/b")
    assert "encoded" not in second.output and "token cache" in second.output
    assert second.metrics["best"]["val/loss"] == first.metrics["best"]["val/loss"]


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_weights_of_an_unbroken_run(bprun, tmp_path, data_dir):
    path = corpus(tmp_path)
    args = [
        *TINY,
        f"dataset.path={path}",
        "trainer.max_updates=100",
        "trainer.val_every_n_updates=50",
        "trainer.checkpoint.every_n_updates=10",
        "model.dropout=0.1",
    ]  # dropout draws from the RNG the checkpoint must restore
    reference = bprun(*args, f"hydra.run.dir={tmp_path}/ref")
    expected = model_state(reference.run_dir)
    run_dir = tmp_path / "killed"
    last = run_dir / "checkpoints" / "last.pt"
    proc = start(args, data_dir, run_dir)
    wait_for_update(proc, last, 30)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert saved_update(last) < 100, "the run finished before it was killed"
    resumed = bprun(f"trainer.resume={run_dir}")
    assert "resumed from" in resumed.output
    got = model_state(run_dir)
    for k in expected:
        assert torch.equal(got[k], expected[k]), f"{k} differs after the resume"


@pytest.mark.slow
def test_two_ranks_sigkill_then_resume_gives_the_unbroken_weights(bprun, tmp_path, data_dir):
    path = corpus(tmp_path)
    args = [
        *TINY,
        f"dataset.path={path}",
        "trainer.max_updates=60",
        "trainer.devices=2",
        "trainer.val_every_n_updates=30",
        "trainer.checkpoint.every_n_updates=10",
        "model.dropout=0.1",
    ]
    reference = bprun(*args, f"hydra.run.dir={tmp_path}/ref")
    assert reference.metrics["world_size"] == 2
    expected = model_state(reference.run_dir)
    run_dir = tmp_path / "killed"
    last = run_dir / "checkpoints" / "last.pt"
    proc = subprocess.Popen(
        [
            BPRUN,
            f"paths.data_dir={data_dir}",
            "trainer.threads=1",
            "trainer.progress=false",
            f"hydra.run.dir={run_dir}",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    wait_for_update(proc, last, 20, timeout=240)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.communicate()
    assert saved_update(last) < 60, "the run finished before it was killed"
    resumed = bprun(f"trainer.resume={run_dir}")
    assert "resumed from" in resumed.output
    got = model_state(run_dir)
    for k in expected:
        assert torch.equal(got[k], expected[k]), f"{k} differs after the resume"


def test_gpt_trains_with_checkpointing_ema_bf16_and_rope(bprun, tmp_path):
    r = bprun(
        *TINY,
        f"dataset.path={corpus(tmp_path)}",
        "trainer.max_updates=6",
        "trainer.val_every_n_updates=3",
        "model.activation_checkpointing=true",
        "model.rope=true",
        "trainer.ema.decay=0.9",
        "trainer.precision=bf16-mixed",
    )
    last = r.metrics["history"][-1]
    assert math.isfinite(last["val/loss"]) and math.isfinite(last["val_ema/loss"])
    assert "wpe.weight" not in model_state(r.run_dir)  # rotary positions: no table


def reviews(tmp_path: Path) -> Path:
    import csv
    import random

    rng = random.Random(0)
    good = ["a wonderful film", "great acting and a fine story", "I loved it", "superb"]
    bad = ["a dull mess", "terrible acting, awful story", "I hated it", "boring and slow"]
    path = tmp_path / "reviews.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "sentiment"])
        for _ in range(200):
            positive = rng.random() < 0.5
            w.writerow([rng.choice(good if positive else bad), "pos" if positive else "neg"])
    return path


def test_text_classification_with_a_gpt_encoder(bprun, tmp_path):
    path = reviews(tmp_path)
    data = [
        "dataset=text_classification",
        f"dataset.path={path}",
        "dataset.text=review",
        "dataset.target=sentiment",
        "dataset.block_size=32",
    ]
    model = ["model=gpt", "model.n_layer=1", "model.n_head=2", "model.n_embd=32"]
    r = bprun(*data, *model, "optim=adamw", "optim.lr=3e-3", "trainer.max_epochs=4")
    assert r.metrics["test"]["test/acc"] >= 0.9
    assert json.loads((r.run_dir / "classes.json").read_text()) == ["neg", "pos"]
    assert json.loads((r.run_dir / "tokenizer.json").read_text())["kind"] == "char"
    g = bprun("task=generate", f"ckpt={r.run_dir}", check=False)
    assert g.returncode != 0 and "error: task=generate samples from a language model" in g.output
    wrong = bprun(*data[:3], "dataset.target=stars", *model, check=False)
    assert "error: dataset.target=stars is not a column" in wrong.output
    mlp = bprun(*data, "model=mlp", check=False)
    assert "error: model=bprun.models.MLP does not read token ids" in mlp.output
