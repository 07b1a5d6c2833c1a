"""Image datasets in torchvision's own on-disk layout, loaded as compact uint8 tensors.

Files are read from `<data_dir>` exactly where torchvision puts them
(`MNIST/raw/train-images-idx3-ubyte`, `cifar-10-batches-py/data_batch_1`, ...),
so a folder filled by torchvision, by hand or by `dataset.download=true` works
alike. Images stay uint8 (N, C, H, W): a quarter of the memory of float32 on
the training device; the loader's per-batch transform makes them float and
normalises them there.

MNIST-style files are parsed by torchvision's dataset classes. CIFAR files are
pickles: torchvision unpickles them without restriction and only after an MD5
check against the published files, so here they are read with an unpickler
that can build numpy arrays and nothing else. Any file in the format loads,
and none can run code.
"""

from __future__ import annotations

import codecs
import gzip
import pickle
import shutil
from pathlib import Path

import numpy as np
import torch
import torchvision.datasets as tvd

from bprun.data.sources import Dataset
from bprun.errors import BprunError
from bprun.io import atomic_write

# option name -> (torchvision class, classes)
DATASETS = {
    "mnist": (tvd.MNIST, 10),
    "fashion_mnist": (tvd.FashionMNIST, 10),
    "kmnist": (tvd.KMNIST, 10),
    "cifar10": (tvd.CIFAR10, 10),
    "cifar100": (tvd.CIFAR100, 100),
}


def load_vision(
    name: str,
    data_dir: str = "data",
    download: bool = False,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> Dataset:
    """One of `DATASETS` as uint8 (N, C, H, W) images and int64 labels, with its mean/std."""
    if name not in DATASETS:
        raise BprunError(f"dataset name '{name}' is not known: choose one of {', '.join(DATASETS)}")
    cls, num_classes = DATASETS[name]
    read = _read_cifar if issubclass(cls, tvd.CIFAR10) else _read_mnist
    x_train, y_train, x_test, y_test = read(cls, name, Path(data_dir), download)
    channels = x_train.shape[1]
    for key, value in (("mean", mean), ("std", std)):
        if value is not None and len(value) != channels:
            raise BprunError(
                f"dataset.{key} has {len(value)} values but {name} has {channels} channel(s)"
            )
    if std is not None and min(std) <= 0:
        raise BprunError(f"dataset.std must be positive, got {list(std)}")
    return Dataset(
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=num_classes,
        mean=tuple(mean) if mean is not None else None,
        std=tuple(std) if std is not None else None,
    )


def _missing(name: str, folder: Path, files: list[str], note: str = "") -> BprunError:
    return BprunError(
        f"dataset={name}: {folder} lacks {', '.join(files)}{note}; fetch them with "
        f"dataset.download=true (needs internet), or copy torchvision's files there"
    )


def _download(cls, name: str, root: Path, folder: Path) -> None:
    """torchvision's own download, which checks the published MD5 sums."""
    try:
        cls(str(root), train=False, download=True)
    except Exception as e:
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BprunError(
            f"dataset.download=true could not fetch {name} into {folder} ({cause}); "
            "check the connection, or copy the files there by hand"
        ) from None


# ---------------------------------------------------------------- MNIST family


def _read_mnist(cls, name: str, root: Path, download: bool):
    """IDX files under `<root>/<Class>/raw/`, raw or gzipped (unpacked next to the .gz once)."""
    folder = root / cls.__name__ / "raw"
    files = [Path(url).stem for url, _ in cls.resources]  # without .gz
    _gunzip_missing(folder, files)
    if download and any(not (folder / f).is_file() for f in files):
        _download(cls, name, root, folder)
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise _missing(name, folder, missing, " (raw or .gz)")
    splits = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=False)
        except Exception as e:  # torchvision asserts on malformed IDX headers
            raise BprunError(
                f"dataset={name}: cannot read the IDX files in {folder} "
                f"({type(e).__name__}: {str(e)[:120]}); replace them, e.g. delete them and "
                "rerun with dataset.download=true"
            ) from None
        if len(ds.data) != len(ds.targets):
            raise BprunError(
                f"dataset={name}: {len(ds.data)} images but {len(ds.targets)} labels in "
                f"the {'train' if train else 't10k'} files of {folder}"
            )
        splits += [ds.data.unsqueeze(1).contiguous(), ds.targets.long()]
    return tuple(splits)


def _gunzip_missing(folder: Path, files: list[str]) -> None:
    """Unpack `f.gz` to `f` where only the .gz is there, atomically (a crash leaves no half file)."""
    for f in files:
        raw, packed = folder / f, folder / f"{f}.gz"
        if raw.is_file() or not packed.is_file():
            continue
        try:
            with gzip.open(packed, "rb") as src:
                atomic_write(raw, lambda dst, src=src: shutil.copyfileobj(src, dst))
        except (OSError, EOFError) as e:
            raise BprunError(
                f"cannot unpack {packed} ({type(e).__name__}: {e}); the file is damaged: "
                "delete it and fetch it again (dataset.download=true)"
            ) from None


# ---------------------------------------------------------------- CIFAR


def _read_cifar(cls, name: str, root: Path, download: bool):
    """Pickled batches under `<root>/<cls.base_folder>/` (the class's train_list/test_list)."""
    folder = root / cls.base_folder
    train_files = [f for f, _ in cls.train_list]
    test_files = [f for f, _ in cls.test_list]
    every = train_files + test_files
    if download and any(not (folder / f).is_file() for f in every):
        _download(cls, name, root, folder)
    missing = [f for f in every if not (folder / f).is_file()]
    if missing:
        raise _missing(name, folder, missing)
    return (*_cifar_batches(folder, train_files), *_cifar_batches(folder, test_files))


def _cifar_batches(folder: Path, files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for f in files:
        path = folder / f
        try:
            with open(path, "rb") as fh:
                entry = _ArrayUnpickler(fh, encoding="latin1").load()
            data = np.asarray(entry["data"], dtype=np.uint8)
            target = entry["labels"] if "labels" in entry else entry["fine_labels"]
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
            raise BprunError(
                f"cannot read {path}: not a CIFAR batch ({type(e).__name__}: {str(e)[:120]}); "
                "replace it, e.g. delete the folder and rerun with dataset.download=true"
            ) from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(target) != len(data):
            raise BprunError(
                f"cannot read {path}: expected data (N, 3072) and N labels, got data "
                f"{data.shape} and {len(target)} labels"
            )
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))  # rows are CHW
        labels.append(torch.as_tensor(np.asarray(target, dtype=np.int64)))
    return torch.cat(images), torch.cat(labels)


def _numpy_reducers() -> dict[tuple[str, str], object]:
    """The few globals a pickled numpy array refers to, under numpy 1.x and 2.x module names."""
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    allowed[("_codecs", "encode")] = codecs.encode  # bytes pickled by Python 3 at protocol <= 2
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings, numbers and numpy arrays; refuses every other global."""

    allowed = _numpy_reducers()

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None
