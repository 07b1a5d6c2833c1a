"""Dataset sources: each returns a `Dataset` of CPU tensors with a train and a test split.

A source is any callable named by `_target_` in `conf/dataset/*.yaml`; it is
called with that node's other keys and returns a `Dataset`. The image sets
read through torchvision live in `bprun.data.vision`, the generated
regression and forecasting tasks in `bprun.data.synthetic`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bprun.errors import BprunError
from bprun.io import atomic_write


@dataclass
class Dataset:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int  # classes for classification, labels for multilabel, outputs for regression
    # The problem the data poses (a kind of bprun.problems.KINDS): what `problem=auto` picks.
    problem: str = "classification"
    # uint8 images are kept as they are and made float per batch on the device:
    # x / 255, then (x - mean) / std per channel. None: mean 0, std 1.
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # None: validation examples are drawn at random from the training set. An int:
    # the examples are in time order, so validation takes the last ones, after
    # dropping this many so that no validation target is seen in training.
    split_gap: int | None = None
    # Sources that carve (or read) their own validation split, so that statistics they fit
    # (standardisation, normalisation) see the training split alone, set these.
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None
    # Class names, in label order (written to the run folder as classes.json).
    classes: list[str] | None = None
    # What the source fitted on the training split (plain values): saved in checkpoints and
    # handed back to the source as `state=` by eval and resume, so they use the same.
    state: dict | None = None
    # Float inputs that are pixel intensities in this range, e.g. (0, 1): adversarial attacks
    # keep to it (uint8 images need none: x / 255 lies in [0, 1]). None: no known range.
    value_range: tuple[float, float] | None = None
    # Under cross-validation (`task=cv`): which examples of the source validate in this fold
    # (table row numbers, image files), written to the fold's folder as val_rows.json.
    val_rows: list | None = None
    # Token streams of a language model (`bprun.data.text.TokenStreams`): the loaders draw
    # windows from them (`bprun.data.windows`) and the x/y tensors only carry the shape.
    streams: object | None = None
    # Token-id inputs (text classification): the vocabulary, padding id included, and the id
    # that pads a sequence (models mask it out). Handed to models that take them.
    vocab_size: int | None = None
    pad_id: int | None = None
    # What the problem reads besides num_classes (a ranking problem: the user and item counts,
    # the users' training items), and what the model is built with (`num_users`).
    info: dict | None = None
    # `f(x_train, seed, epoch) -> inputs of that epoch` (sampled negatives): a pure function of
    # its arguments, so resume stays exact; the in-memory loader calls it once an epoch.
    epoch_inputs: object | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def nbytes(x) -> int:
    """Bytes of `x` once decoded: a tensor, or a lazy source such as `ImageFiles`."""
    return x.nbytes if isinstance(x, torch.Tensor) else x.decoded_nbytes


def carve(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, carved) indices of n examples: a seeded `fraction` of them carved out."""
    if not 0.0 <= fraction < 1.0:
        raise BprunError(f"split fractions must be in [0, 1), got {fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(round(n * fraction))
    return order[k:], order[:k]


def split_validation(
    x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int, gap: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Carve a validation split off the training set with a fixed seed.

    The seed is separate from the run's seed, so runs with different seeds
    validate on the same examples. With `gap` (time-ordered examples) the
    validation set is the last `fraction` of the examples instead, and the
    `gap` examples just before it are dropped (see `Dataset.split_gap`).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"dataset.val_fraction must be in [0, 1), got {fraction}")
    n_val = int(round(len(x) * fraction))
    if gap is not None:
        end = max(0, len(x) - n_val - gap) if n_val else len(x)
        start = len(x) - n_val
        return x[:end], y[:end], x[start:], y[start:]
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def load_mnist1d(data_dir: str = "data", num_samples: int = 5000, seed: int = 42) -> Dataset:
    """MNIST-1D with the reference generator settings (4000 train / 1000 test).

    Generating takes about a second; the tensors are cached under
    `<data_dir>/mnist1d/` keyed by the generator's settings.
    """
    cache = Path(data_dir) / "mnist1d" / f"mnist1d_n{num_samples}_seed{seed}.pt"
    if cache.exists():
        try:
            arrays = torch.load(cache, weights_only=True)
        except Exception:  # a damaged cache is regenerated, never trusted
            arrays = None
    else:
        arrays = None
    if arrays is None:
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples, args.seed = num_samples, seed
        raw = make_dataset(args)
        arrays = {k: torch.from_numpy(np.asarray(raw[k])) for k in ("x", "y", "x_test", "y_test")}
        atomic_write(cache, lambda f: torch.save(arrays, f))
    # (N, 40) signals become (N, 1, 40): one channel, so 1-D convolutions apply directly.
    return Dataset(
        x_train=arrays["x"].float().unsqueeze(1),
        y_train=arrays["y"].long(),
        x_test=arrays["x_test"].float().unsqueeze(1),
        y_test=arrays["y_test"].long(),
        num_classes=10,
    )


def load_digits(
    test_fraction: float = 0.2, split_seed: int = 0, classes: list[int] | None = None
) -> Dataset:
    """scikit-learn's 8x8 digits as 1x8x8 images in [0, 1], stratified train/test split.

    `classes` keeps those digits only, labelled 0, 1, ... in the order given: a
    related task for transfer learning (pretrain on 0-4, fine-tune on 5-9).
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    digits = sk_load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8)
    y = digits.target.astype(np.int64)
    num_classes = 10
    if classes is not None:
        classes = [int(c) for c in classes]
        if (
            len(classes) < 2
            or len(set(classes)) != len(classes)
            or not set(classes) <= set(range(10))
        ):
            raise BprunError(
                f"dataset.classes must list at least two different digits 0-9, got {classes}"
            )
        keep = np.isin(y, classes)
        label = np.full(10, -1, dtype=np.int64)
        label[classes] = np.arange(len(classes))
        x, y = x[keep], label[y[keep]]
        num_classes = len(classes)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=split_seed, stratify=y
    )
    return Dataset(
        x_train=torch.from_numpy(x_tr),
        y_train=torch.from_numpy(y_tr),
        x_test=torch.from_numpy(x_te),
        y_test=torch.from_numpy(y_te),
        num_classes=num_classes,
        value_range=(0.0, 1.0),
    )
