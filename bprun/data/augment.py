"""Per-batch transforms on the training device: uint8 -> normalised float, and augmentation.

A whole batch is transformed at once with vectorised tensor ops, so the cost
is a few kernels per batch whatever the batch size. Random draws use torch's
global generator of the batch's device, whose state the trainer checkpoints,
so a resumed run draws the same crops and flips as an uninterrupted one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bprun.errors import BprunError

AUGMENT_KEYS = {"crop_padding": 0, "hflip": False}


def random_crop(x: torch.Tensor, padding: int) -> torch.Tensor:
    """torchvision's RandomCrop(size, padding) with zero fill, for every image of a batch at once."""
    n, c, h, w = x.shape
    wide = w + 2 * padding
    padded = F.pad(x, (padding,) * 4).flatten(2)  # (n, c, (h+2p) * (w+2p))
    dy = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=x.device)
    rows = dy + torch.arange(h, device=x.device).view(1, h, 1)
    cols = dx + torch.arange(w, device=x.device).view(1, 1, w)
    index = (rows * wide + cols).view(n, 1, h * w).expand(n, c, h * w)
    return padded.gather(2, index).view(n, c, h, w)


def random_hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


class BatchTransform:
    """Optional augmentation, then (for uint8 data) x / 255 normalised by mean and std."""

    def __init__(
        self,
        crop_padding: int = 0,
        hflip: bool = False,
        scale: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
    ):
        self.crop_padding, self.hflip = crop_padding, hflip
        self.scale, self.shift = scale, shift

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.crop_padding:
            x = random_crop(x, self.crop_padding)
        if self.hflip:
            x = random_hflip(x)
        if self.scale is not None:
            x = torch.addcmul(self.shift, x.float(), self.scale)  # x * scale + shift
        return x

    def __repr__(self) -> str:
        return (
            f"BatchTransform(crop_padding={self.crop_padding}, hflip={self.hflip}, "
            f"normalize={self.scale is not None})"
        )


def make_transforms(
    x: torch.Tensor,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
    augment: dict | None,
    device: torch.device,
) -> tuple[BatchTransform | None, BatchTransform | None]:
    """(train transform, eval transform) for data like `x`; None where there is nothing to do.

    uint8 data is made float and normalised in both; augmentation (the
    `dataset.augment` node) is added to the training one only.
    """
    settings = dict(AUGMENT_KEYS)
    if augment:
        unknown = sorted(set(augment) - set(AUGMENT_KEYS))
        if unknown:
            raise BprunError(
                f"dataset.augment has unknown key(s) {', '.join(unknown)}: "
                f"the keys are {', '.join(AUGMENT_KEYS)}"
            )
        settings.update({k: v for k, v in augment.items() if v is not None})
    padding, hflip = int(settings["crop_padding"]), bool(settings["hflip"])
    if padding < 0:
        raise BprunError(f"dataset.augment.crop_padding must be >= 0, got {padding}")
    if (padding or hflip) and x.dim() != 4:
        raise BprunError(
            f"dataset.augment needs images (N, C, H, W), but this dataset's inputs are "
            f"{tuple(x.shape[1:])}: set dataset.augment.crop_padding=0 and hflip=false"
        )
    scale = shift = None
    if x.dtype == torch.uint8:
        channels = x.shape[1]
        m = torch.tensor(mean if mean is not None else (0.0,) * channels)
        s = torch.tensor(std if std is not None else (1.0,) * channels)
        view = (1, channels) + (1,) * (x.dim() - 2)
        scale = (1.0 / (255.0 * s)).view(view).to(device)
        shift = (-m / s).view(view).to(device)
    train = (
        BatchTransform(padding, hflip, scale, shift)
        if padding or hflip or scale is not None
        else None
    )
    test = BatchTransform(scale=scale, shift=shift) if scale is not None else None
    return train, test
