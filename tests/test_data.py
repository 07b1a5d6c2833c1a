"""Datasets, batch transforms and regression losses: tiny files in the real formats, real code paths."""

from __future__ import annotations

import gzip
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from bprun.build import build_data, build_loss
from bprun.data import augment, split_validation
from bprun.data.augment import make_transforms, random_hflip
from bprun.data.synthetic import load_regression, load_timeseries
from bprun.data.vision import load_vision
from bprun.errors import BprunError
from bprun.problems.classification import Classification
from bprun.problems.regression import Regression

ROOT = Path(__file__).resolve().parents[1]
MNIST_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "kmnist": "KMNIST"}
CPU = torch.device("cpu")


# ---------------------------------------------------------------- writers of the real formats


def pattern_images(labels: np.ndarray, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """uint8 images whose class is a bright horizontal bar at row 2 * label, on low noise."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, size=(len(labels), *shape), dtype=np.uint8)
    for i, k in enumerate(labels):
        x[i, ..., 2 * k : 2 * k + 2, :] = 255
    return x


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    """The IDX format of LeCun's MNIST files: magic (0, 0, 0x08 = uint8, ndim), big-endian sizes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def write_mnist(root: Path, folder: str = "MNIST", n_train=200, n_test=50, gz=False) -> dict:
    raw = root / folder / "raw"
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = pattern_images(y, (28, 28), seed=n)
        write_idx(raw / f"{split}-images-idx3-ubyte", x, gz)
        write_idx(raw / f"{split}-labels-idx1-ubyte", y, gz)
        arrays[split] = (x, y)
    return arrays


def write_cifar(root: Path, hundred: bool = False, per_file: int = 40) -> dict:
    """torchvision's CIFAR layout: pickled dicts with 'data' (N, 3072) uint8 rows in CHW order,
    'labels' (CIFAR-10) or 'fine_labels' + 'coarse_labels' (CIFAR-100), and the meta file."""
    rng = np.random.default_rng(1)
    if hundred:
        folder, train_files, test_files = root / "cifar-100-python", ["train"], ["test"]
        meta = (
            "meta",
            {
                "fine_label_names": [f"c{i}" for i in range(100)],
                "coarse_label_names": [f"s{i}" for i in range(20)],
            },
        )
        classes = 100
    else:
        folder = root / "cifar-10-batches-py"
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files = ["test_batch"]
        meta = (
            "batches.meta",
            {
                "label_names": [f"c{i}" for i in range(10)],
                "num_cases_per_batch": per_file,
                "num_vis": 3072,
            },
        )
        classes = 10
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in train_files + test_files:
        y = rng.integers(0, classes, per_file)
        x = pattern_images(y % 10, (3, 32, 32), seed=len(written))
        entry = {
            "batch_label": name,
            "data": x.reshape(per_file, -1),
            "filenames": ["f.png"] * per_file,
        }
        if hundred:
            entry.update(fine_labels=y.tolist(), coarse_labels=(y // 5).tolist())
        else:
            entry["labels"] = y.tolist()
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        written[name] = (x, y)
    (folder / meta[0]).write_bytes(pickle.dumps(meta[1], protocol=2))
    return written


def data_node(name: str, data_dir: Path, **extra) -> OmegaConf:
    """The shipped config of dataset `name`, pointed at data_dir."""
    node = OmegaConf.load(ROOT / "conf" / "dataset" / f"{name}.yaml")
    node = OmegaConf.merge(node, {"data_dir": str(data_dir)} if "data_dir" in node else {}, extra)
    return node


# ---------------------------------------------------------------- torchvision datasets


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("name", list(MNIST_FOLDERS))
def test_mnist_family_reads_idx_files_raw_and_gzipped(tmp_path, name, gz):
    arrays = write_mnist(tmp_path, MNIST_FOLDERS[name], gz=gz)
    ds = load_vision(name, str(tmp_path))
    assert ds.x_train.dtype == torch.uint8 and ds.x_train.shape == (200, 1, 28, 28)
    assert ds.x_test.shape == (50, 1, 28, 28) and ds.input_shape == (1, 28, 28)
    assert torch.equal(ds.x_train[:, 0], torch.from_numpy(arrays["train"][0]))
    assert torch.equal(ds.y_test, torch.from_numpy(arrays["t10k"][1]).long())
    assert (
        ds.y_train.dtype == torch.int64 and ds.num_classes == 10 and ds.problem == "classification"
    )
    if gz:  # unpacked once, next to the .gz, where torchvision itself would look
        assert (tmp_path / MNIST_FOLDERS[name] / "raw" / "train-images-idx3-ubyte").is_file()


@pytest.mark.parametrize("hundred", [False, True], ids=["cifar10", "cifar100"])
def test_cifar_reads_pickled_batches_like_torchvision(tmp_path, hundred, monkeypatch):
    import torchvision.datasets as tvd

    written = write_cifar(tmp_path, hundred)
    ds = load_vision("cifar100" if hundred else "cifar10", str(tmp_path))
    n_train = 40 if hundred else 200
    assert ds.x_train.dtype == torch.uint8 and ds.x_train.shape == (n_train, 3, 32, 32)
    assert ds.num_classes == (100 if hundred else 10)
    # torchvision's own reader (its MD5 check switched off for these made-up files) agrees
    cls = tvd.CIFAR100 if hundred else tvd.CIFAR10
    for attr in ("train_list", "test_list"):
        monkeypatch.setattr(cls, attr, [[f, None] for f, _ in getattr(cls, attr)])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": None})
    for train, (x, y) in ((True, (ds.x_train, ds.y_train)), (False, (ds.x_test, ds.y_test))):
        ref = cls(str(tmp_path), train=train)
        assert torch.equal(x, torch.from_numpy(ref.data).permute(0, 3, 1, 2))  # HWC -> CHW
        assert y.tolist() == list(ref.targets)
    test_file = "test" if hundred else "test_batch"
    assert torch.equal(ds.x_test.flatten(1), torch.from_numpy(written[test_file][0]).flatten(1))


def test_cifar_pickle_cannot_run_code(tmp_path):
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(BprunError, match="not a CIFAR batch.*test_batch|test_batch.*not a CIFAR"):
        load_vision("cifar10", str(tmp_path))
    assert not marker.exists()


@pytest.mark.parametrize("name", ["mnist", "kmnist", "cifar10", "cifar100"])
def test_missing_files_name_folder_files_and_download_switch(tmp_path, name):
    with pytest.raises(BprunError) as err:
        load_vision(name, str(tmp_path))
    msg = str(err.value)
    assert "\n" not in msg and "dataset.download=true" in msg
    if name in MNIST_FOLDERS:
        assert str(tmp_path / MNIST_FOLDERS[name] / "raw") in msg
        assert "train-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg
    else:
        folder = "cifar-100-python" if name == "cifar100" else "cifar-10-batches-py"
        assert str(tmp_path / folder) in msg and ("test_batch" in msg or "train" in msg)


def test_only_the_missing_files_are_listed_and_bad_idx_is_a_clear_error(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(BprunError, match="lacks t10k-labels-idx1-ubyte \\(raw or .gz\\)"):
        load_vision("mnist", str(tmp_path))
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").write_bytes(b"\x01\x02\x03\x04junk")
    with pytest.raises(BprunError, match="cannot read the IDX files"):
        load_vision("mnist", str(tmp_path))


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_download_uses_torchvision_and_its_failure_is_one_clear_line(tmp_path, monkeypatch, name):
    import torchvision.datasets as tvd

    cls = tvd.MNIST if name == "mnist" else tvd.CIFAR10
    calls = []

    def offline(self):
        calls.append(self.root)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried ..., got URLError")

    monkeypatch.setattr(cls, "download", offline)
    with pytest.raises(BprunError) as err:
        load_vision(name, str(tmp_path), download=True)
    msg = str(err.value)
    assert calls and "\n" not in msg and "could not fetch" in msg and str(tmp_path) in msg
    # files already there: no download is attempted
    calls.clear()
    write_mnist(tmp_path) if name == "mnist" else write_cifar(tmp_path)
    assert len(load_vision(name, str(tmp_path), download=True).x_train) > 0 and not calls


# ---------------------------------------------------------------- normalisation and augmentation


def mnist_data(tmp_path, **extra):
    write_mnist(tmp_path)
    return build_data(data_node("mnist", tmp_path, **extra), CPU, seed=0)


def test_uint8_images_stay_compact_and_become_normalised_float_per_batch(tmp_path):
    data = mnist_data(tmp_path)
    assert data.train.x.dtype == torch.uint8  # stored compactly on the device
    mean, std = data.dataset.mean[0], data.dataset.std[0]
    for loader in (data.train, data.val, data.test):
        x, _ = next(loader.batches())
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28)
        raw = loader.x[: len(x)] if not loader.shuffle else None
        if raw is not None:
            torch.testing.assert_close(x, (raw.float() / 255 - mean) / std)
    # no augmentation configured for digits: the train batch is the normalised raw batch
    perm = data.train.order(0)[: data.train.batch_size]
    x, _ = next(data.train.batches(0))
    torch.testing.assert_close(x, (data.train.x[perm].float() / 255 - mean) / std)


def test_float_data_without_augmentation_gets_no_transform():
    node = OmegaConf.load(ROOT / "conf" / "dataset" / "digits.yaml")
    data = build_data(node, CPU, seed=0)
    assert data.train.transform is None and data.val.transform is None
    assert data.test.transform is None


def test_augmentation_changes_train_batches_only_and_is_reproducible(tmp_path):
    aug = {"augment": {"crop_padding": 4, "hflip": True}}
    data = mnist_data(tmp_path, **aug)
    plain = build_data(data_node("mnist", tmp_path), CPU, seed=0)
    torch.manual_seed(3)
    a = [x for x, _ in data.train.batches(0)]
    torch.manual_seed(3)
    b = [x for x, _ in data.train.batches(0)]
    ref = [x for x, _ in plain.train.batches(0)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))  # same seed, same batches
    assert not torch.equal(a[0], ref[0])  # augmentation did something
    assert all(x.shape == r.shape and x.dtype == r.dtype for x, r in zip(a, ref, strict=True))
    for split in ("val", "test"):  # evaluation batches are never augmented
        for (x, _), (r, _) in zip(
            getattr(data, split).batches(), getattr(plain, split).batches(), strict=True
        ):
            assert torch.equal(x, r)
    torch.manual_seed(4)
    assert not torch.equal(next(data.train.batches(0))[0], a[0])  # another seed, other crops


@pytest.mark.parametrize("precomputed", [True, False], ids=["table", "computed"])
def test_crop_and_flip_give_a_shifted_window_of_the_zero_padded_image(monkeypatch, precomputed):
    if not precomputed:
        monkeypatch.setattr(augment, "TABLE_LIMIT", 0)
    x = torch.randint(1, 256, (64, 3, 6, 5), dtype=torch.uint8)
    for hflip in (False, True):
        out = augment.CropFlip(2, hflip)(x)
        assert out.shape == x.shape and out.dtype == x.dtype
        padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
        seen = set()
        for i in range(len(x)):
            hits = [
                (dy, dx, flip)
                for dy in range(5)
                for dx in range(5)
                for flip in (False, True)
                if torch.equal(out[i], _maybe_flip(padded[i, :, dy : dy + 6, dx : dx + 5], flip))
            ]
            assert hits, f"image {i} is not a crop of its padded original"
            seen.update(hits)
        assert len({(dy, dx) for dy, dx, _ in seen}) > 5  # offsets vary across the batch
        assert {flip for _, _, flip in seen} == ({False, True} if hflip else {False})


def _maybe_flip(x: torch.Tensor, flip: bool) -> torch.Tensor:
    return x.flip(-1) if flip else x


def test_random_hflip_mirrors_about_half_of_the_images():
    torch.manual_seed(0)
    x = torch.rand(400, 1, 4, 4)
    out = random_hflip(x)
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)])
    same = torch.tensor([torch.equal(o, i) for o, i in zip(out, x, strict=True)])
    assert bool((flipped | same).all()) and 120 < int(flipped.sum()) < 280


def test_cifar_config_augments_and_mnist_config_does_not(tmp_path):
    write_cifar(tmp_path)
    cifar = build_data(data_node("cifar10", tmp_path), CPU, seed=0)
    assert cifar.train.transform.crop_padding == 4 and cifar.train.transform.hflip
    assert cifar.test.transform.crop_padding == 0 and not cifar.test.transform.hflip
    x, _ = next(cifar.test.batches())
    assert x.dtype == torch.float32 and abs(float(x.mean())) < 3
    mnist = mnist_data(tmp_path)
    assert mnist.train.transform.crop_padding == 0 and not mnist.train.transform.hflip


def test_augment_errors_are_clear():
    x = torch.zeros(4, 1, 40)
    with pytest.raises(BprunError, match="unknown key.*crop_pad"):
        make_transforms(x, None, None, {"crop_pad": 2}, CPU)
    with pytest.raises(BprunError, match="needs images"):
        make_transforms(x, None, None, {"hflip": True}, CPU)


# ---------------------------------------------------------------- regression and forecasting


def test_regression_dataset_shapes_and_targets():
    ds = load_regression(num_samples=500, num_features=7, seed=1)
    assert ds.problem == "regression" and ds.num_classes == 1 and ds.input_shape == (7,)
    assert ds.y_train.shape == (400, 1) and ds.y_test.shape == (100, 1)
    assert ds.y_train.dtype == torch.float32
    assert abs(float(ds.y_train.mean())) < 1e-4 and abs(float(ds.y_train.std()) - 1) < 0.01
    again = load_regression(num_samples=500, num_features=7, seed=1)
    assert torch.equal(ds.x_train, again.x_train)
    with pytest.raises(BprunError, match="num_features"):
        load_regression(num_features=3)


@pytest.mark.parametrize("signal", ["mackey_glass", "sines"])
def test_timeseries_windows_are_chronological_without_leakage(signal):
    window, horizon = 16, 4
    ds = load_timeseries(signal=signal, length=1000, window=window, horizon=horizon)
    assert ds.problem == "regression" and ds.num_classes == horizon
    assert ds.input_shape == (1, window) and ds.y_train.shape[1:] == (horizon,)
    # consecutive windows shift by one sample, targets continue the inputs
    assert torch.equal(ds.x_train[1, 0, :-1], ds.x_train[0, 0, 1:])
    assert torch.equal(ds.y_train[0, 0], ds.x_train[horizon, 0, window - horizon])
    # the first test window's inputs end exactly where training ended, its targets after that
    assert torch.equal(ds.x_test[0, 0, -horizon:], ds.y_train[-1])
    seen = torch.cat([ds.x_train.flatten(), ds.y_train.flatten()])
    assert not torch.isin(ds.y_test.flatten(), seen).any()
    # validation is the end of the training windows, with no target seen in training
    x_tr, y_tr, x_val, y_val = split_validation(ds.x_train, ds.y_train, 0.1, 0, ds.split_gap)
    assert len(x_val) == round(0.1 * len(ds.x_train))
    assert not torch.isin(y_val.flatten(), torch.cat([x_tr.flatten(), y_tr.flatten()])).any()


@pytest.mark.parametrize("loss", ["mse", "l1", "huber"])
def test_regression_losses_check_the_target_kind(loss):
    fn = build_loss(OmegaConf.load(ROOT / "conf" / "loss" / f"{loss}.yaml"), Regression(3))
    out = torch.randn(8, 3)
    assert fn(out, out.clone()).item() == 0
    with pytest.raises(BprunError, match=f"loss={loss} needs float targets"):
        fn(out, torch.zeros(8, dtype=torch.long))
    with pytest.raises(BprunError, match="differ in shape"):
        fn(out, torch.zeros(8, 1))


def test_classification_losses_on_logits():
    out, y = torch.randn(16, 5), torch.randint(0, 5, (16,))
    nll = build_loss(OmegaConf.load(ROOT / "conf" / "loss" / "nll.yaml"), Classification(5))
    torch.testing.assert_close(nll(out, y), torch.nn.functional.cross_entropy(out, y))
    bce = build_loss(
        OmegaConf.load(ROOT / "conf" / "loss" / "bce_with_logits.yaml"), Classification(5)
    )
    onehot = torch.nn.functional.one_hot(y, 5).float()
    torch.testing.assert_close(
        bce(out, y), torch.nn.functional.binary_cross_entropy_with_logits(out, onehot)
    )
    torch.testing.assert_close(bce(out, onehot), bce(out, y))
    with pytest.raises(BprunError, match="loss=nll needs class labels"):
        nll(out, torch.randn(16, 5))


# ---------------------------------------------------------------- end to end


def test_mnist_end_to_end_from_gzipped_files(bprun, tmp_path):
    write_mnist(tmp_path / "files", gz=True, n_train=300)
    r = bprun(
        "dataset=mnist",
        f"paths.data_dir={tmp_path / 'files'}",
        "trainer.max_epochs=3",
        "dataset.batch_size=32",
    )
    m = r.metrics
    assert m["status"] == "completed"
    assert set(m["test"]) == set(Classification(10).metric_names("test"))
    assert m["test"]["test/acc"] > 0.5  # the bar patterns are learnable


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_end_to_end_with_augmentation(bprun, tmp_path, name):
    write_cifar(tmp_path / "files", hundred=name == "cifar100")
    r = bprun(
        f"dataset={name}",
        f"paths.data_dir={tmp_path / 'files'}",
        "trainer.max_epochs=1",
        "model.hidden=[64]",
    )
    assert r.metrics["status"] == "completed" and "test/acc" in r.metrics["test"]


def test_missing_dataset_files_end_to_end(bprun, tmp_path):
    r = bprun("dataset=fashion_mnist", f"paths.data_dir={tmp_path / 'empty'}", check=False)
    assert r.returncode != 0 and "Traceback" not in r.output
    assert str(tmp_path / "empty" / "FashionMNIST" / "raw") in r.output
    assert "dataset.download=true" in r.output and "train-images-idx3-ubyte" in r.output
    assert "cannot build" not in r.output  # the source's own message, not a wrapper


@pytest.mark.parametrize("dataset", ["regression", "timeseries"])
def test_regression_tasks_end_to_end_with_mse_and_huber(bprun, tmp_path, dataset):
    small = "dataset.num_samples=1000" if dataset == "regression" else "dataset.length=1500"
    sweep = tmp_path / "sweep"  # one process, two jobs: the start-up is paid once
    bprun(
        "hydra.mode=MULTIRUN",
        f"hydra.sweep.dir={sweep}",
        f"dataset={dataset}",
        "loss=mse,huber",
        small,
        "trainer.max_epochs=3",
    )
    runs = sorted(sweep.glob("*/metrics.json"))
    assert len(runs) == 2
    for path in runs:
        m = json.loads(path.read_text())
        assert m["status"] == "completed"
        assert {"val/loss", "val/mae", "val/rmse"} <= set(m["best"])
        assert set(m["test"]) == {"test/loss", "test/mae", "test/rmse", "test/r2", "test/mape"}
        first, last = m["history"][0], m["history"][-1]
        assert last["val/rmse"] < 1.0  # better than predicting the (standardised) mean
        assert last["val/rmse"] < first["val/rmse"]


def test_wrong_loss_for_the_task_end_to_end(bprun):
    r = bprun("dataset=timeseries", "loss=nll", "trainer.fast_dev_run=true", check=False)
    assert r.returncode != 0 and "Traceback" not in r.output
    assert "the loss NLLLoss is for classification, but this is a regression" in r.output
    assert "use loss=mse, l1 or huber" in r.output
    assert "use loss=mse, l1 or huber" in r.output
