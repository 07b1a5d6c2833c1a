"""The input pipeline pretrained weights expect (resize, centre crop, mean, std), per batch.

torchvision's weights carry it in their metadata (`weights.transforms()`),
timm's in `pretrained_cfg`. bprun applies it as a forward pre-hook of the
model, on the training device, after the dataset's own transform: the state
dict stays the architecture's own, and `task=eval` rebuilds the same pipeline
from the config. Each part is `auto` (from the weights' metadata, when the
weights have any), null (off) or a value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bprun.errors import BprunError

KEYS = ("resize", "crop", "mean", "std")


@dataclass
class Preprocess:
    resize: int | None = None  # shorter side, in pixels (bilinear, antialiased)
    crop: int | None = None  # centre crop to crop x crop, zero-padded when smaller
    mean: tuple[float, ...] | None = None  # replaces the dataset's normalisation
    std: tuple[float, ...] | None = None
    # The dataset's normalisation of uint8 images, undone before `mean` and `std` apply.
    source_mean: tuple[float, ...] | None = None
    source_std: tuple[float, ...] | None = None

    @classmethod
    def resolve(cls, node: dict | str | None, meta: dict | None) -> Preprocess:
        """`model.preprocess` (a dict of KEYS, or `none`) against the weights' metadata."""
        if node is None or node == "none":
            return cls()
        if node == "auto":
            node = {}
        if not isinstance(node, dict) or set(node) - set(KEYS):
            raise BprunError(
                f"model.preprocess must be auto, none, or a mapping of {', '.join(KEYS)} "
                f"(each auto, null or a value), got {node}"
            )
        meta = meta or {}
        values = {}
        for key in KEYS:
            value = node.get(key, "auto")
            values[key] = meta.get(key) if value == "auto" else value
        if (values["mean"] is None) != (values["std"] is None):
            raise BprunError("model.preprocess needs both mean and std, or neither")
        for key in ("resize", "crop"):
            if values[key] is not None and int(values[key]) < 1:
                raise BprunError(
                    f"model.preprocess.{key} must be a positive size, got {values[key]}"
                )
        return cls(
            resize=None if values["resize"] is None else int(values["resize"]),
            crop=None if values["crop"] is None else int(values["crop"]),
            mean=None if values["mean"] is None else tuple(float(v) for v in values["mean"]),
            std=None if values["std"] is None else tuple(float(v) for v in values["std"]),
        )

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.resize, self.crop, self.mean))

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """The (H, W) the network sees for (h, w) images."""
        if self.resize is not None:
            h, w = _resized(h, w, self.resize)
        if self.crop is not None:
            h = w = self.crop
        return h, w

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in KEYS}

    def attach(self, model: nn.Module, dataset) -> None:
        """Register the pipeline on `model`, undoing the dataset's normalisation if it replaces it."""
        if not self.active:
            return
        if self.mean is not None and dataset.x_train.dtype == torch.uint8 and dataset.mean:
            self.source_mean, self.source_std = tuple(dataset.mean), tuple(dataset.std)
        model.register_forward_pre_hook(_Hook(self))


def _resized(h: int, w: int, size: int) -> tuple[int, int]:
    """torchvision's Resize(size): the shorter side becomes `size`, the ratio is kept."""
    if h <= w:
        return size, max(1, int(size * w / h))
    return max(1, int(size * h / w)), size


def _per_channel(values: tuple[float, ...], channels: int) -> list[float]:
    """RGB statistics for other channel counts: their mean for grey, cycled otherwise."""
    if len(values) == channels:
        return list(values)
    if channels == 1:
        return [sum(values) / len(values)]
    return [values[i % len(values)] for i in range(channels)]


class _Hook:
    def __init__(self, spec: Preprocess):
        self.spec = spec
        self._stats: dict = {}  # (device, dtype, channels) -> tensors, made once per device

    def _affine(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) with x * scale + shift = weights-normalised input."""
        key = (x.device, x.dtype, x.shape[1])
        if key not in self._stats:
            s, c = self.spec, x.shape[1]
            scale, shift = torch.ones(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
            if s.source_mean is not None:  # back to [0, 1]
                sm = torch.tensor(_per_channel(s.source_mean, c), dtype=torch.float64)
                ss = torch.tensor(_per_channel(s.source_std, c), dtype=torch.float64)
                scale, shift = ss, sm
            m = torch.tensor(_per_channel(s.mean, c), dtype=torch.float64)
            sd = torch.tensor(_per_channel(s.std, c), dtype=torch.float64)
            scale, shift = scale / sd, (shift - m) / sd
            view = (1, c, 1, 1)
            self._stats[key] = (
                scale.to(x.dtype).view(view).to(x.device),
                shift.to(x.dtype).view(view).to(x.device),
            )
        return self._stats[key]

    def __call__(self, module: nn.Module, args: tuple):
        x, s = args[0], self.spec
        if not x.is_floating_point():
            x = x.float()
        if s.resize is not None:
            size = _resized(x.shape[-2], x.shape[-1], s.resize)
            if size != tuple(x.shape[-2:]):
                x = F.interpolate(
                    x, size=size, mode="bilinear", align_corners=False, antialias=True
                )
        if s.crop is not None:
            x = _center_crop(x, s.crop)
        if s.mean is not None:
            scale, shift = self._affine(x)
            x = torch.addcmul(shift, x, scale)
        return (x, *args[1:])


def _center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's CenterCrop: the middle size x size window, zero-padded when smaller."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        ph, pw = max(0, size - h), max(0, size - w)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top : top + size, left : left + size]


def timm_meta(cfg: dict | None) -> dict | None:
    """timm's pretrained_cfg as resize/crop/mean/std (its eval transform's sizes)."""
    if not cfg or "input_size" not in cfg:
        return None
    size = int(cfg["input_size"][-1])
    return {
        "resize": math.floor(size / cfg.get("crop_pct", 1.0)),
        "crop": size,
        "mean": cfg.get("mean"),
        "std": cfg.get("std"),
    }
