"""Your own data: image folders, tables, arrays; the seeded sampler; the streaming path.

Every test writes real files (PNG and JPEG images, CSV and Parquet tables, .npz
arrays) that carry signal, and trains on them through the real build path.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BPRUN
from hydra import compose, initialize_config_module
from PIL import Image
from test_checkpoint import model_state, saved_update, start, wait_for_update
from test_data import write_cifar

from bprun.build import build_data
from bprun.config import register_configs
from bprun.data import loader as loader_module
from bprun.data.loader import InMemoryLoader
from bprun.data.sampler import SeededSampler
from bprun.data.stream import StreamLoader, TensorRows
from bprun.data.table import load_table
from bprun.errors import BprunError
from bprun.tasks.eval import run as evaluate
from bprun.tasks.train import run as train

CPU = torch.device("cpu")
COLOURS = ("red", "green", "blue")


def write_images(root: Path, per_class: int, size: int = 12, seed: int = 0) -> Path:
    """Three classes told apart by their dominant colour, half PNG and half JPEG."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(COLOURS):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 100, (size, size, 3), dtype=np.uint8)
            img[..., c] += 110
            Image.fromarray(img).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def write_table(n: int = 400, seed: int = 0):
    """Columns with signal: y is 'hi' when 2*a - b + (colour=='red') > 0."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    a, b = rng.normal(3.0, 2.0, n), rng.normal(-1.0, 0.5, n)
    colour = rng.choice(["red", "green", "blue"], n)
    score = 2 * (a - 3.0) / 2.0 - (b + 1.0) / 0.5 + 1.5 * (colour == "red") - 0.5
    return pd.DataFrame(
        {
            "a": a,
            "b": b,
            "colour": colour,
            "noise": rng.normal(size=n),
            "y": np.where(score > 0, "hi", "lo"),
        }
    )


def compose_cfg(*overrides: str):
    register_configs()
    with initialize_config_module("bprun.conf", version_base="1.3"):
        return compose(
            "config", overrides=["trainer.progress=false", "trainer.threads=1", *overrides]
        )


def train_here(tmp_path: Path, *overrides: str) -> dict:
    """One training run in this process; its metrics.json."""
    train(compose_cfg(*overrides), tmp_path)
    return json.loads((tmp_path / "metrics.json").read_text())


# ---------------------------------------------------------------- the sampler


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_sampler_shards_are_the_one_process_batches(world_size):
    n, batch = 103, 12  # the last batch is short and does not divide evenly
    one = SeededSampler(n, batch, shuffle=True, seed=5)
    ranks = [SeededSampler(n, batch, True, 5, r, world_size) for r in range(world_size)]
    for epoch in (0, 3):
        whole = dict(one.batches(epoch))
        shares = [dict(r.batches(epoch)) for r in ranks]
        assert all(len(s) == len(whole) == 9 for s in shares)
        for b, idx in whole.items():
            parts = [s[b] for s in shares]
            assert torch.equal(torch.cat(parts), idx)  # same global batch, rank order
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1
            assert sum(r.batch_len(b) for r in ranks) == one.batch_len(b) == len(idx)
        seen = torch.cat([torch.cat(list(s.values())) for s in shares])
        assert sorted(seen.tolist()) == list(range(n))  # every example once per epoch
    assert not torch.equal(ranks[0].indices(0, 0), ranks[0].indices(1, 0))  # epochs differ


def test_sampler_resumes_from_any_position_and_rejects_bad_ranks():
    s = SeededSampler(50, 8, shuffle=True, seed=1)
    full = list(s.batches(2))
    for first in (0, 3, 6):
        tail = list(s.batches(2, first))
        assert [b for b, _ in tail] == list(range(first, 7))
        assert all(torch.equal(i, j) for (_, i), (_, j) in zip(tail, full[first:], strict=True))
    with pytest.raises(ValueError, match="rank 2"):
        SeededSampler(50, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="cannot be shared"):
        SeededSampler(50, 2, rank=0, world_size=4)


def test_in_memory_loader_keeps_its_order():
    """The in-memory order is the sampler's, and still today's (seed * 1000003 + epoch) permutation."""
    x = torch.arange(30).float().unsqueeze(1)
    loader = InMemoryLoader(x, torch.arange(30), 7, shuffle=True, seed=4)
    g = torch.Generator().manual_seed(4 * 1_000_003 + 1)
    expected = torch.randperm(30, generator=g)
    got = torch.cat([xb[:, 0] for xb, _ in loader.batches(1)]).long()
    assert torch.equal(got, expected)


@pytest.mark.parametrize("block_batches", [1, 2, 100])
@pytest.mark.parametrize("world_size", [1, 3])
def test_blocks_of_shuffled_batches_hold_each_batchs_own_examples(
    block_batches, world_size, monkeypatch
):
    """Shuffled batches are gathered a block at a time; whatever the block, from the first batch
    or a resumed one, each batch holds exactly the sampler's examples for it, in its order."""
    n, per_rank = 53, 4
    x = torch.arange(n * 3).float().reshape(n, 3)
    y = torch.arange(n) * 10
    row_bytes = 3 * 4 + 8
    monkeypatch.setattr(
        loader_module, "BLOCK_BYTES", block_batches * row_bytes * per_rank * world_size
    )
    for rank in range(world_size):
        loader = InMemoryLoader(x, y, per_rank, shuffle=True, seed=7).shard(rank, world_size)
        for epoch, first in ((0, 0), (1, 3)):
            got = list(loader.batches(epoch, first))
            assert len(got) == len(loader) - first
            for b, (xb, yb) in enumerate(got, start=first):
                idx = loader.sampler.indices(epoch, b)
                assert torch.equal(xb, x[idx]) and torch.equal(yb, y[idx])


@pytest.mark.parametrize("world_size", [1, 3])
def test_both_loaders_read_the_samplers_shares(world_size):
    """In memory and streamed, each rank gets the same share of the same global batches; a
    last batch smaller than the world gives the ranks without a share one stand-in example
    that counts for nothing (local_len 0)."""
    n, per_rank = 25, 4  # world 3: global batches of 12, 12 and 1
    x, y = torch.arange(n).float().unsqueeze(1), torch.arange(n)
    counted = []
    for rank in range(world_size):
        memory = InMemoryLoader(x, y, per_rank, shuffle=True, seed=3).shard(rank, world_size)
        sampler = SeededSampler(n, per_rank, shuffle=True, seed=3)
        stream = StreamLoader(TensorRows(x, y), sampler, torch.device("cpu")).shard(
            rank, world_size
        )
        assert len(memory) == len(stream) == (3 if world_size == 3 else 7)
        for epoch in (0, 2):
            pairs = zip(memory.batches(epoch), stream.batches(epoch), strict=True)
            for b, ((xm, ym), (xs, ys)) in enumerate(pairs):
                assert torch.equal(xm, xs) and torch.equal(ym, ys)
                assert len(ym) >= 1
                assert memory.local_len(b) == stream.local_len(b) <= len(ym)
                if epoch == 0:
                    counted += ym[: memory.local_len(b)].tolist()
    assert sorted(counted) == list(range(n))  # every example once per epoch over the ranks


@pytest.mark.parametrize("rank", [0, 2])
def test_a_ranks_loaders_unsharded_read_the_one_process_batches(rank):
    """`unsharded()` gives a rank the whole global batches (what SWA's BatchNorm pass reads)."""
    n, per_rank = 25, 4
    x, y = torch.arange(n).float().unsqueeze(1), torch.arange(n)
    one = list(InMemoryLoader(x, y, per_rank * 3, shuffle=True, seed=3).batches(1))
    memory = InMemoryLoader(x, y, per_rank, shuffle=True, seed=3).shard(rank, 3)
    stream = StreamLoader(
        TensorRows(x, y), SeededSampler(n, per_rank, shuffle=True, seed=3), torch.device("cpu")
    ).shard(rank, 3)
    for loader in (memory, stream):
        whole = list(loader.unsharded().batches(1))
        assert len(whole) == len(one) == 3
        for (xw, yw), (xo, yo) in zip(whole, one, strict=True):
            assert torch.equal(xw, xo) and torch.equal(yw, yo)
        assert len(list(loader.batches(1))[0][1]) == per_rank  # the rank's own loader is unchanged


def test_streamed_batches_depend_on_their_key_alone(images):
    """A worker's crops come from the batch's (seed, epoch, batch) key, not from its history:
    the premise of exact mid-epoch resume with several workers."""
    from bprun.data.augment import ResizedCropFlip
    from bprun.data.image_folder import ImageFiles, scan

    _, files, labels = scan(images)
    source = ImageFiles(files, torch.tensor(labels), (12, 12), 3)
    source.augment, source.seed = ResizedCropFlip((0.3, 1.0), hflip=True), 7
    idx = torch.arange(8)
    first, _ = source.fetch(idx, epoch=1, batch=2)
    source.fetch(idx, epoch=0, batch=0)  # other work in between
    again, _ = source.fetch(idx, epoch=1, batch=2)
    other, _ = source.fetch(idx, epoch=1, batch=3)
    assert torch.equal(first, again) and not torch.equal(first, other)
    source.augment = None
    decoded = source.fetch(idx, 0, 0)[0].float()
    whole = ResizedCropFlip((1.0, 1.0), (1.0, 1.0))(decoded)  # the full window, unflipped
    assert torch.allclose(whole, decoded, atol=1e-3)


# ---------------------------------------------------------------- sources


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("images") / "colours", per_class=30)


def test_image_folder_trains_and_writes_class_names(bprun, images, tmp_path):
    r = bprun(
        "dataset=image_folder",
        f"dataset.root={images}",
        "dataset.image_size=12",
        "dataset.batch_size=16",
        "trainer.max_epochs=4",
    )
    assert "data: in memory, on the training device (auto:" in r.stdout
    assert r.metrics["test"]["test/acc"] >= 0.8  # chance is 1/3
    assert json.loads((r.run_dir / "classes.json").read_text()) == sorted(COLOURS)
    saved = torch.load(r.run_dir / "checkpoints" / "last.pt", weights_only=True)["extra"]
    assert len(saved["data"]["mean"]) == 3  # training-split statistics, reused by eval/resume


def test_image_folder_uses_train_val_test_folders(images, tmp_path):
    root = tmp_path / "split"
    for part, seed in (("train", 1), ("val", 2), ("test", 3)):
        write_images(root / part, per_class=4 if part != "train" else 10, seed=seed)
    data = build_data(compose_cfg("dataset=image_folder", f"dataset.root={root}").dataset, CPU, 0)
    assert (data.train.num_samples, data.val.num_samples, data.test.num_samples) == (30, 12, 12)
    # image_size=auto: the images' own 12x12
    assert data.train.x.dtype == torch.uint8 and data.train.x.shape[1:] == (3, 12, 12)


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_table_trains_with_numeric_and_categorical_columns(kind, tmp_path):
    frame = write_table()
    path = tmp_path / f"t.{kind}"
    frame.to_csv(path, index=False) if kind == "csv" else frame.to_parquet(path)
    m = train_here(
        tmp_path,
        "dataset=table",
        f"dataset.path={path}",
        "dataset.target=y",
        "model=logreg",
        "optim.lr=0.05",
        "trainer.max_epochs=8",
    )
    assert m["test"]["test/acc"] >= 0.85  # two classes: chance is about 1/2
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["extra"]["data"]
    a = next(f for f in state["features"] if f["name"] == "a")
    colour = next(f for f in state["features"] if f["name"] == "colour")
    assert abs(a["mean"] - 3.0) < 0.4 and colour["categories"] == ["blue", "green", "red"]
    assert state["task"] == "classification" and state["classes"] == ["hi", "lo"]
    if kind == "csv":  # task=eval rebuilds the data with the checkpoint's encoding
        evaluate(compose_cfg("task=eval", f"ckpt={tmp_path}"), tmp_path / "eval")
        evaluated = json.loads((tmp_path / "checkpoints" / "eval.json").read_text())
        assert evaluated["test/acc"] == pytest.approx(m["test"]["test/acc"])


def test_table_encodes_with_the_stored_state_and_infers_regression(tmp_path):
    frame = write_table(100)
    frame["y"] = frame["a"] * 2.0
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    fitted = load_table(str(path), "y")
    assert fitted.problem == "regression" and fitted.y_train.shape[1:] == (1,)
    col = [f["name"] for f in fitted.state["features"]].index("a")
    assert abs(float(fitted.x_train[:, col].mean())) < 1e-5  # standardised on the train split
    shifted = json.loads(json.dumps(fitted.state))
    shifted["features"][col]["mean"] += 1.0
    again = load_table(str(path), "y", state=shifted)  # e.g. eval: the checkpoint's encoding
    assert torch.allclose(
        again.x_train[:, col], fitted.x_train[:, col] - 1 / fitted.state["features"][col]["std"]
    )


def test_arrays_npz_trains(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    np.savez(tmp_path / "a.npz", x_train=x[:240], y_train=y[:240], x_test=x[240:], y_test=y[240:])
    m = train_here(
        tmp_path, "dataset=arrays", f"dataset.path={tmp_path / 'a.npz'}", "trainer.max_epochs=5"
    )
    assert m["test"]["test/acc"] >= 0.85


# ---------------------------------------------------------------- bad input


def test_bad_input_is_one_line_naming_the_problem(tmp_path):
    def error(*overrides) -> str:
        with pytest.raises(BprunError) as e:
            build_data(compose_cfg(*overrides).dataset, CPU, 0)
        message = str(e.value)
        assert "\n" not in message
        return message

    folder = tmp_path / "imgs"
    assert "does not exist" in error("dataset=image_folder", f"dataset.root={folder}")
    folder.mkdir()
    assert "no class folders" in error("dataset=image_folder", f"dataset.root={folder}")
    write_images(folder, per_class=4)
    (folder / "empty").mkdir()
    assert "empty has no images" in error("dataset=image_folder", f"dataset.root={folder}")
    (folder / "empty").rmdir()
    (folder / "red" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert "red/bad.png" in error("dataset=image_folder", f"dataset.root={folder}")
    data = build_data(
        compose_cfg(
            "dataset=image_folder", f"dataset.root={folder}", "dataset.skip_corrupt=true"
        ).dataset,
        CPU,
        0,
    )
    assert data.train.num_samples + data.val.num_samples + data.test.num_samples == 12

    frame = write_table(50)
    csv = tmp_path / "t.csv"
    frame.to_csv(csv, index=False)
    table = ("dataset=table", f"dataset.path={csv}")
    assert "the columns are a, b, colour, noise, y" in error(*table, "dataset.target=label")
    frame["a"] = frame["a"].astype(object)
    frame.loc[7, "a"] = "x7"
    frame.to_csv(csv, index=False)
    assert "'a'" in error(*table, "dataset.target=y") and "'x7'" in error(
        *table, "dataset.target=y"
    )
    frame = write_table(50)
    frame.loc[[3, 9], "b"] = np.nan
    frame.to_csv(csv, index=False)
    assert "column 'b' has 2 missing value(s)" in error(*table, "dataset.target=y")
    data = build_data(
        compose_cfg(*table, "dataset.target=y", "dataset.fill_missing=mean").dataset, CPU, 0
    )
    assert torch.isfinite(data.train.x).all()
    test_csv = tmp_path / "test.csv"
    unseen = write_table(20, seed=1)
    unseen.loc[0, "y"] = "maybe"
    unseen.to_csv(test_csv, index=False)
    write_table(50).to_csv(csv, index=False)
    assert "maybe" in error(*table, "dataset.target=y", f"dataset.test_path={test_csv}")

    np.savez(tmp_path / "a.npz", x=np.zeros((4, 2)), y=np.zeros(4))
    assert "it holds x, y" in error("dataset=arrays", f"dataset.path={tmp_path / 'a.npz'}")
    assert "dataset.loader must be" in error("dataset=digits", "dataset.loader=disk")
    assert "is not a size" in error("dataset=digits", "dataset.memory_budget=lots")


def test_bad_input_exits_non_zero_with_one_line(bprun, tmp_path):
    r = bprun("dataset=image_folder", f"dataset.root={tmp_path / 'nope'}", check=False)
    assert r.returncode != 0 and "Traceback" not in r.output
    assert f"dataset.root={tmp_path / 'nope'} does not exist" in r.output


# ---------------------------------------------------------------- the streaming path


@pytest.mark.parametrize("dataset", ["digits", "cifar10"])
def test_stream_gives_the_in_memory_metrics_on_a_shipped_dataset(dataset, tmp_path):
    """digits: float inputs; CIFAR-10 files: uint8 images cropped and flipped on the device."""
    write_cifar(tmp_path, per_file=16)
    common = (
        f"dataset={dataset}",
        f"paths.data_dir={tmp_path}",
        "dataset.batch_size=16",
        "trainer.max_epochs=2",
        "model.dropout=0.1",
    )
    memory = train_here(tmp_path / "memory", *common, "dataset.loader=memory")
    stream = train_here(
        tmp_path / "stream", *common, "dataset.loader=stream", "dataset.num_workers=2"
    )
    for key, value in memory["test"].items():
        assert stream["test"][key] == pytest.approx(value, rel=1e-5, abs=1e-6)
    assert stream["updates"] == memory["updates"]


@pytest.mark.slow
def test_stream_sigkill_mid_epoch_then_resume_is_bit_identical(bprun, images, data_dir, tmp_path):
    args = [
        "dataset=image_folder",
        f"dataset.root={images}",
        "dataset.image_size=12",
        "dataset.batch_size=8",  # 9 updates per epoch
        "dataset.loader=stream",
        "dataset.num_workers=2",
        "model.dropout=0.2",
        "trainer.max_epochs=3",
        "trainer.checkpoint.every_n_updates=1",
    ]
    reference = bprun(*args, f"hydra.run.dir={tmp_path}/ref")
    total = reference.metrics["updates"]
    run_dir = tmp_path / "killed"
    proc = start(args, data_dir, run_dir)
    wait_for_update(proc, run_dir / "checkpoints" / "last.pt", 11)  # mid epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = saved_update(run_dir / "checkpoints" / "last.pt")
    per_epoch = total // 3
    assert 0 < killed_at < total and killed_at % per_epoch != 0, killed_at
    resumed = bprun(f"trainer.resume={run_dir}")
    assert resumed.metrics["updates"] == total
    expected, got = model_state(reference.run_dir), model_state(run_dir)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert resumed.metrics["test"] == reference.metrics["test"]


@pytest.mark.slow
def test_auto_streams_past_the_budget_and_memory_stays_bounded(tmp_path):
    """Small files decoded at 512x512: 600 images are 450 MiB decoded, held nowhere at once."""
    root = write_images(tmp_path / "big", per_class=200, size=8)
    decoded = 600 * 3 * 512 * 512
    args = [
        f"paths.data_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "trainer.threads=1",
        "trainer.progress=false",
        "dataset=image_folder",
        f"dataset.root={root}",
        "dataset.batch_size=4",
        "dataset.eval_batch_size=4",
        "dataset.memory_budget=1MiB",
        "dataset.num_workers=1",
        "dataset.stats_samples=4",
        "model=logreg",
        "trainer.fast_dev_run=true",
    ]

    def peak_rss(*extra: str) -> tuple[int, str]:
        # A fresh parent per measurement: RUSAGE_CHILDREN is the largest child it waited for.
        code = (
            "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True,"
            " text=True); print(p.stdout + p.stderr);"
            " print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
        )
        out = subprocess.run([sys.executable, "-c", code, *extra], capture_output=True, text=True)
        *lines, peak = out.stdout.strip().splitlines()
        return int(peak) * 1024, "\n".join(lines)

    # The same run on 8x8 images held in memory: the process's own size, without the data.
    # (Measured: 1140 MiB; streaming at 512x512 1142 MiB; in memory at 512x512 1595 MiB.)
    baseline, _ = peak_rss(BPRUN, *args, "dataset.image_size=8", "dataset.loader=memory")
    peak, output = peak_rss(BPRUN, *args, "dataset.image_size=512")
    assert "data: streaming (DataLoader, 1 worker(s)) (auto:" in output, output
    assert "exceeds dataset.memory_budget=1.0 MiB" in output
    assert peak < baseline + decoded // 2, (peak, baseline)
    print(f"peak {peak >> 20} MiB, baseline {baseline >> 20} MiB, decoded {decoded >> 20} MiB")
