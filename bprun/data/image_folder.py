"""Your own images: torchvision's ImageFolder layout, one sub-folder per class.

    root/cat/001.png  root/dog/xyz.jpg ...            (splits carved with fixed seeds)
    root/train/cat/...  root/val/...  root/test/...   (splits used as they are)

Files are listed and checked when the run starts; pixels are decoded only when
needed: all at once into a uint8 tensor for the in-memory path, or batch by
batch in the DataLoader workers when streaming (`ImageFiles.fetch`). Either way
an image is decoded with `torchvision.io`, converted to `channels` and resized
to `image_size` with `torchvision.transforms.v2`.
"""

from __future__ import annotations

import logging
import statistics
import warnings
from pathlib import Path

import torch

from bprun.data.sampler import epoch_seed
from bprun.data.sources import Dataset, carve
from bprun.errors import BprunError

log = logging.getLogger("bprun")

EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".webp")  # what torchvision.io decodes


class ImageFiles:
    """Image files standing in for an (N, C, H, W) uint8 tensor: indexing by a tensor of
    positions gives a subset, `fetch` decodes a batch, `load` decodes them all."""

    def __init__(
        self,
        paths: list[str],
        labels: torch.Tensor,
        size: tuple[int, int],
        channels: int,
    ):
        self.paths, self.labels = list(paths), labels
        self.size, self.channels = size, channels
        self.augment = None  # set on the training split when the workers augment
        self.seed = 0

    # -- the parts of the tensor interface the splitting and transform code uses
    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.paths), self.channels, *self.size))

    dtype = torch.uint8

    def dim(self) -> int:
        return 4

    @property
    def decoded_nbytes(self) -> int:
        return len(self.paths) * self.channels * self.size[0] * self.size[1]

    def __getitem__(self, index: torch.Tensor) -> ImageFiles:
        index = torch.as_tensor(index).reshape(-1).tolist()
        return ImageFiles(
            [self.paths[i] for i in index], self.labels[index], self.size, self.channels
        )

    # -- decoding
    def decode(self, i: int) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_image, read_file
        from torchvision.transforms.v2 import functional as TF

        mode = ImageReadMode.RGB if self.channels == 3 else ImageReadMode.GRAY
        try:
            with warnings.catch_warnings():
                # torchvision 0.29 warns on each decode that TorchCodec will take decoding
                # over; its decoders still work, and a warning per image is noise.
                warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
                image = decode_image(read_file(self.paths[i]), mode=mode)
        except Exception as e:  # a file that passed the start-up check but will not decode
            raise BprunError(
                f"cannot decode image {self.paths[i]} ({e}): replace or delete the file, "
                "or set dataset.skip_corrupt=true"
            ) from None
        if image.dim() == 4:  # an animated GIF: its first frame
            image = image[0]
        if tuple(image.shape[-2:]) != self.size:
            image = TF.resize(image, list(self.size), antialias=True)
        return image

    def fetch(self, indices: torch.Tensor, epoch: int, batch: int):
        """One batch, decoded (in a DataLoader worker when streaming), augmented if set."""
        index = indices.tolist()
        x = torch.stack([self.decode(i) for i in index])
        if self.augment is not None:
            # Seeded by the batch's key alone: the same crops whichever worker builds it.
            g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch) * 7919 + batch)
            x = self.augment(x, g)
        return x, self.labels[index]

    def load(self, num_workers: int = 0) -> torch.Tensor:
        """Every image decoded, as one (N, C, H, W) uint8 tensor (the in-memory path)."""
        from bprun.data.sampler import SeededSampler
        from bprun.data.stream import StreamLoader

        augment, self.augment = self.augment, None
        try:
            loader = StreamLoader(
                self, SeededSampler(len(self), 256), torch.device("cpu"), num_workers=num_workers
            )
            parts = [x for x, _ in loader.batches()]
        finally:
            self.augment = augment
        return torch.cat(parts) if parts else torch.empty(self.shape, dtype=torch.uint8)


def _size(image_size) -> tuple[int, int]:
    bad = BprunError(
        f"dataset.image_size must be auto, a positive int or [height, width], got {image_size}"
    )
    if isinstance(image_size, int):
        size = (image_size, image_size)
    elif isinstance(image_size, (list, tuple)) and all(isinstance(v, int) for v in image_size):
        size = tuple(image_size)
    else:
        raise bad
    if len(size) != 2 or min(size) < 1:
        raise bad
    return size


def scan(folder: Path, classes: list[str] | None = None) -> tuple[list[str], list[str], list[int]]:
    """(class names, files, labels) of an ImageFolder-layout folder. `classes`: those of the
    training split, which a validation or test folder must not go beyond."""
    if not folder.is_dir():
        raise BprunError(
            f"dataset.root: {folder} is not a folder; point dataset.root at a folder with one "
            "sub-folder of images per class"
        )
    found = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise BprunError(
            f"{folder} has no class folders: put each class's images in a sub-folder "
            f"({folder}/<class>/<image>.png)"
        )
    if classes is not None:
        unseen = sorted(set(found) - set(classes))
        if unseen:
            raise BprunError(
                f"{folder} has class folder(s) {', '.join(unseen)} that the training split lacks: "
                "add training images for them or remove the folder(s)"
            )
    names = classes if classes is not None else found
    files, labels = [], []
    for name in found:
        images = sorted(
            str(p)
            for p in (folder / name).rglob("*")
            if p.suffix.lower() in EXTENSIONS and p.is_file()
        )
        if not images:
            raise BprunError(
                f"class folder {folder / name} has no images ({', '.join(EXTENSIONS)}): "
                "add some or remove the folder"
            )
        files += images
        labels += [names.index(name)] * len(images)
    return names, files, labels


def auto_size(sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """`image_size=auto`: the images' (height, width) when they all share it, else the median
    height and the median width. Said in the run's first lines."""
    if len(set(sizes)) == 1:
        size = sizes[0]
        log.info(f"data: image_size=auto: {size[0]}x{size[1]}, the size of all {len(sizes)} images")
        return size
    size = (
        round(statistics.median(h for h, _ in sizes)),
        round(statistics.median(w for _, w in sizes)),
    )
    lo, hi = min(sizes), max(sizes)
    log.info(
        f"data: image_size=auto: {size[0]}x{size[1]}, the median of {len(sizes)} images' sizes "
        f"({lo[0]}x{lo[1]} to {hi[0]}x{hi[1]}); every image is resized to it"
    )
    return size


def check_images(
    files: list[str], labels: list[int], skip_corrupt: bool
) -> tuple[list, list, list]:
    """Open every file before training starts (PIL reads its header and checks its structure),
    so a bad file stops the run now, named, rather than mid-epoch in a worker.
    (files, labels, (height, width) sizes) of the readable ones."""
    from PIL import Image

    good_files, good_labels, sizes, bad = [], [], [], []
    for path, label in zip(files, labels, strict=True):
        try:
            with Image.open(path) as im:
                width, height = im.size
                im.verify()
        except Exception:
            if not skip_corrupt:
                raise BprunError(
                    f"cannot read image {path}: it is corrupt or not an image; delete it, or "
                    "set dataset.skip_corrupt=true to skip such files"
                ) from None
            bad.append(path)
            continue
        good_files.append(path)
        good_labels.append(label)
        sizes.append((height, width))
    if bad:
        log.warning(
            f"skipped {len(bad)} corrupt image(s) (dataset.skip_corrupt=true), e.g. {bad[0]}"
        )
    return good_files, good_labels, sizes


def channel_stats(images: ImageFiles, samples: int, seed: int = 0) -> tuple[list, list]:
    """Per-channel mean and std in [0, 1] units over up to `samples` images (a seeded draw)."""
    n = len(images)
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: max(1, samples)]
    x = images[pick.sort().values].load().double() / 255.0
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp(min=1e-6)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def load_image_folder(
    root: str,
    image_size="auto",
    channels: int = 3,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    skip_corrupt: bool = False,
    stats_samples: int = 1000,
    val_fraction: float = 0.1,
    val_seed: int = 0,
    state: dict | None = None,
    fold: dict | None = None,
) -> Dataset:
    """Images and class names from `root`; see the module docstring for the layouts.

    Without `root/test` a seeded `test_fraction` of the images is the test split (seed
    `split_seed`); without `root/val` a `val_fraction` of the rest is validation (seed
    `val_seed`). Normalisation statistics are those given, or computed on the training split.
    `image_size`: an int, [height, width], or auto (see `auto_size`; a checkpoint's `state`
    keeps the size it chose, so eval and resume read images as training did).
    """
    if not root:
        raise BprunError("dataset=image_folder needs dataset.root=<folder of class folders>")
    if channels not in (1, 3):
        raise BprunError(f"dataset.channels must be 1 (grey) or 3 (RGB), got {channels}")
    auto = image_size == "auto"
    size = None if auto else _size(image_size)
    if auto and state and state.get("image_size"):
        size = tuple(state["image_size"])
        log.info(f"data: image_size=auto: {size[0]}x{size[1]}, as the checkpoint's run chose")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise BprunError(
            f"dataset.root={root} does not exist: point it at a folder of class folders"
        )
    train_dir = base / "train" if (base / "train").is_dir() else base

    def split(folder: Path, classes=None) -> tuple[list[str], ImageFiles]:
        nonlocal size
        names, files, labels = scan(folder, classes)
        files, labels, sizes = check_images(files, labels, skip_corrupt)
        if not files:
            raise BprunError(f"{folder} has no readable images")
        if size is None:  # auto, from the training folder (read first)
            size = auto_size(sizes)
        return names, ImageFiles(files, torch.tensor(labels), size, channels)

    classes, train = split(train_dir)
    if len(classes) < 2:
        raise BprunError(f"{train_dir} has one class folder ({classes[0]}); a classifier needs two")
    if (base / "test").is_dir():
        _, test = split(base / "test", classes)
    else:
        keep, held = carve(len(train), test_fraction, split_seed)
        train, test = train[keep], train[held]
    if (base / "val").is_dir():
        _, val = split(base / "val", classes)
    elif fold is not None:  # task=cv: fold k of the training pool, stratified by class
        from bprun.data.folds import fold_split

        if fold.get("group"):
            raise BprunError(
                "cv.group names a column of a table; an image folder's folds are stratified by "
                "class: drop cv.group"
            )
        keep, held = fold_split(len(train), fold, train.labels.numpy())
        pool = train
        train, val = train[keep], train[held]
        val_rows = held.tolist()
    else:
        keep, held = carve(len(train), val_fraction, val_seed)
        train, val = train[keep], train[held]
    if len(train) == 0 or len(test) == 0:
        raise BprunError(
            f"{root} has too few images ({len(train)} train, {len(test)} test): add images or "
            "adjust dataset.test_fraction / dataset.val_fraction"
        )
    if state and state.get("mean") is not None:
        mean, std = state["mean"], state["std"]
    elif mean is None or std is None:
        mean, std = channel_stats(train, stats_samples)
    for name, v in (("mean", mean), ("std", std)):
        if len(v) != channels:
            raise BprunError(f"dataset.{name} needs {channels} values (one per channel), got {v}")
    return Dataset(
        x_train=train,
        y_train=train.labels,
        x_test=test,
        y_test=test.labels,
        x_val=val if len(val) else None,
        y_val=val.labels if len(val) else None,
        num_classes=len(classes),
        mean=tuple(mean),
        std=tuple(std),
        classes=classes,
        state={"mean": list(mean), "std": list(std), "image_size": list(size)},
        val_rows=[str(pool.paths[i]) for i in val_rows] if fold is not None else None,
    )
