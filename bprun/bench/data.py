"""Benchmark of the data paths: `python -m bprun.bench --data [--images 2048] [--workers 2]`.

On one folder of PNG and JPEG images (written to a temporary folder first):

1. bprun's streaming path (`dataset=image_folder dataset.loader=stream`) against
   a hand-written `torch.utils.data.DataLoader` loop with the same workers:
   per-image decode with `torchvision.io`, resize, RandomResizedCrop and flip
   from `transforms.v2`, batches moved to the device with `non_blocking` and
   normalised there;
2. bprun's in-memory path against its streaming path on the same folder
   (which fits in memory).

Each side delivers every training batch of one epoch to the device per round;
rounds alternate which side goes first, and the median of the per-round ratios
of samples per second is reported.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_module

from bprun.build import build_data
from bprun.config import register_configs


def write_folder(root: Path, images: int, size: int, classes: int = 4) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(images):
        c = i % classes
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


class HandWritten(torch.utils.data.Dataset):
    """What a user writes: one image per __getitem__, transforms.v2 per image."""

    def __init__(self, files: list[str], labels: list[int], size: int, scale):
        from torchvision.transforms import v2

        self.files, self.labels, self.size = files, labels, size
        self.augment = v2.Compose(
            [
                v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True),
                v2.RandomHorizontalFlip(),
            ]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        from torchvision.io import ImageReadMode, decode_image, read_file
        from torchvision.transforms.v2 import functional as TF

        image = decode_image(read_file(self.files[i]), mode=ImageReadMode.RGB)
        image = TF.resize(image, [self.size, self.size], antialias=True)
        return self.augment(image), self.labels[i]


def main(args) -> None:
    register_configs()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_folder(Path(tmp) / "images", args.images, args.image_size)
        with initialize_config_module("bprun.conf", version_base="1.3"):
            cfg = compose(
                "config",
                overrides=[
                    "dataset=image_folder",
                    f"dataset.root={root}",
                    f"dataset.image_size={args.image_size}",
                    # the resized crop the hand-written pipeline does, at any image size
                    "dataset.augment.resized_crop=[0.35,1.0]",
                    f"dataset.batch_size={args.batch_size}",
                    f"dataset.num_workers={args.workers}",
                ],
            )
        node = cfg.dataset
        stream = build_data(_with(node, loader="stream"), device, seed=0)
        memory = build_data(_with(node, loader="memory"), device, seed=0)
        files, labels = stream.train.source.paths, stream.train.source.labels.tolist()
        mean = torch.tensor(stream.dataset.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(stream.dataset.std, device=device).view(1, 3, 1, 1)
        plain = torch.utils.data.DataLoader(
            HandWritten(files, labels, args.image_size, node.augment.resized_crop),
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=args.workers,
            pin_memory=device.type == "cuda",
            persistent_workers=args.workers > 0,
            prefetch_factor=2 if args.workers > 0 else None,
        )

        def hand_written(epoch: int) -> int:
            n = 0
            for x, y in plain:
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                x = (x.float() / 255 - mean) / std
                n += len(y)
            return n

        def loader_of(data):
            def run(epoch: int) -> int:
                n = 0
                for _, y in data.train.batches(epoch):
                    n += len(y)
                return n

            return run

        print(
            f"torch {torch.__version__}, {args.images} images "
            f"{args.image_size}x{args.image_size} (PNG+JPEG), batch {args.batch_size}, "
            f"{args.workers} worker(s), {args.rounds} rounds of one epoch "
            f"({stream.train.num_samples} training images), {device}"
        )
        print(f"{'comparison':<36} {'bprun samples/s':>16} {'other samples/s':>16} {'ratio':>7}")
        for label, ours, theirs in (
            ("stream vs hand-written DataLoader", loader_of(stream), hand_written),
            ("in-memory vs stream", loader_of(memory), loader_of(stream)),
        ):
            a, b = compare(ours, theirs, args.rounds, device)
            ratio = statistics.median(x / y for x, y in zip(a, b, strict=True))
            print(
                f"{label:<36} {statistics.median(a):>16.0f} {statistics.median(b):>16.0f} "
                f"{ratio:>7.3f}",
                flush=True,
            )


def _with(node, **values):
    from omegaconf import OmegaConf

    node = OmegaConf.create(OmegaConf.to_container(node, resolve=True))
    for k, v in values.items():
        node[k] = v
    return node


def compare(ours, theirs, rounds: int, device: torch.device) -> tuple[list, list]:
    def timed(run, epoch: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        n = run(epoch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return n / (time.perf_counter() - t)

    a, b = [], []
    for r in range(rounds + 1):  # round 0 starts the workers and warms the caches
        if r % 2:
            y, x = timed(theirs, r), timed(ours, r)
        else:
            x, y = timed(ours, r), timed(theirs, r)
        if r > 0:
            a.append(x)
            b.append(y)
    return a, b
