"""Any classification architecture of torchvision or timm, fitted to the dataset.

`model=torchvision model.name=<builder>` and `model=timm model.name=<name>`:
the head has the dataset's number of classes, the first convolution takes the
dataset's channels, and `model.weights` (a file, or DEFAULT) fills in what fits
(see `bprun.models.weights`). Pretrained weights bring their own input
pipeline (`bprun.models.preprocess`), applied unless `model.preprocess` says
otherwise.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import torch
from torch import nn

from bprun.errors import BprunError
from bprun.models.preprocess import Preprocess, timm_meta
from bprun.models.weights import (
    load_matching,
    read_state_dict,
    torchvision_state_dict,
    torchvision_weights,
)

# DEFAULT, IMAGENET1K_V2 or ResNet50_Weights.IMAGENET1K_V2: a weights enum entry, not a path.
ENUM_NAME = re.compile(r"^(\w+_Weights\.)?[A-Z][A-Z0-9_]*$")


def _image_shape(input_shape: tuple[int, ...], family: str) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(
            f"model={family} needs images shaped (C, H, W), got inputs shaped "
            f"{tuple(input_shape)}: use model=cnn, gru, lstm or transformer for sequences "
            "and model=mlp for feature vectors"
        )
    return tuple(int(v) for v in input_shape)


def _unknown(kind: str, name: str, names: list[str]) -> BprunError:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f"close names: {', '.join(close)}" if close else f"e.g. {', '.join(names[:8])}"
    return BprunError(f"{kind} has no classification model '{name}' ({hint})")


def torchvision_model(
    input_shape: tuple[int, ...],
    num_classes: int,
    name: str = "resnet18",
    weights: str | None = None,
    preprocess: dict | str | None = "auto",
    **kwargs,
) -> nn.Module:
    """A `torchvision.models` classification builder with `num_classes` outputs.

    `weights`: None (random), DEFAULT or an entry of the builder's weights
    enum (torch hub's cache), or a state-dict file. Other keyword arguments go
    to the builder (`dropout`, `stochastic_depth_prob`, `image_size`, ...).
    """
    import torchvision

    channels, h, w = _image_shape(input_shape, "torchvision")
    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise _unknown("torchvision.models", name, names)
    enum_entry = torchvision_weights(name, weights) if _is_enum(weights) else None
    meta = None
    if enum_entry is not None:
        t = enum_entry.transforms()
        meta = {"resize": t.resize_size[0], "crop": t.crop_size[0], "mean": t.mean, "std": t.std}
    spec = Preprocess.resolve(preprocess, meta)
    size = spec.output_size(h, w)
    if name.startswith("vit_"):  # a ViT is built for one square image size
        if size[0] != size[1]:
            raise BprunError(
                f"{name} needs square images, these are {size[0]}x{size[1]}: "
                "set model.preprocess.crop=<size>"
            )
        kwargs.setdefault("image_size", size[0])
    elif name == "maxvit_t":
        kwargs.setdefault("input_size", size)
    elif name in ("googlenet", "inception_v3"):  # one output, not a tuple with auxiliary heads
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", True)
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise ValueError(f"torchvision's {name} does not accept these arguments: {e}") from None
    if channels != 3:
        adapt_first_conv(model, channels)
    model.weights_reports = []
    if enum_entry is not None:
        source = f"{type(enum_entry).__name__}.{enum_entry.name}"
        model.weights_reports.append(
            load_matching(model, torchvision_state_dict(enum_entry), source)
        )
    elif weights:
        model.weights_reports.append(load_matching(model, read_state_dict(weights), str(weights)))
    model.preprocess_spec = spec
    return model


def timm_model(
    input_shape: tuple[int, ...],
    num_classes: int,
    name: str = "resnet18",
    weights: str | None = None,
    preprocess: dict | str | None = "auto",
    **kwargs,
) -> nn.Module:
    """`timm.create_model(name)` with `num_classes` outputs and the dataset's channels.

    `weights`: None (random), DEFAULT (timm's pretrained weights, through the
    Hugging Face cache) or a state-dict file. Other keyword arguments go to
    `create_model` (`drop_rate`, `drop_path_rate`, ...).
    """
    try:
        import timm
    except ImportError:
        raise BprunError(
            "model=timm needs the timm extra: pip install 'bprun[timm]' (or pip install timm)"
        ) from None
    channels, h, w = _image_shape(input_shape, "timm")
    if not timm.is_model(name):
        raise _unknown("timm", name, timm.list_models())
    pretrained = weights == "DEFAULT"
    cfg = timm.get_pretrained_cfg(name)
    cfg = cfg.to_dict() if cfg is not None else {}
    spec = Preprocess.resolve(preprocess, timm_meta(cfg) if pretrained else None)
    size = spec.output_size(h, w)
    if cfg.get("fixed_input_size"):  # ViT-like: built for one image size
        kwargs.setdefault("img_size", size)
    try:
        model = timm.create_model(name, num_classes=num_classes, in_chans=channels, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise ValueError(f"timm's {name} does not accept these arguments: {e}") from None
    model.weights_reports = []
    if pretrained:
        try:
            state = timm.create_model(name, pretrained=True).state_dict()
        except Exception as e:  # offline: huggingface_hub or urllib errors of many kinds
            hub = cfg.get("hf_hub_id") or cfg.get("url") or name
            raise BprunError(
                f"cannot fetch timm's pretrained weights for {name} from {hub} "
                f"({type(e).__name__}); without network, download its model.safetensors "
                "elsewhere and give model.weights=<that file>"
            ) from None
        model.weights_reports.append(load_matching(model, state, f"timm:{name}"))
    elif weights:
        model.weights_reports.append(load_matching(model, read_state_dict(weights), str(weights)))
    model.preprocess_spec = spec
    return model


def _is_enum(weights: str | None) -> bool:
    """DEFAULT or an entry name, unless a file of that name is there."""
    return (
        isinstance(weights, str) and bool(ENUM_NAME.match(weights)) and not Path(weights).exists()
    )


def adapt_first_conv(model: nn.Module, channels: int) -> None:
    """Give the stem (the first Conv2d) `channels` inputs, keeping its other settings.

    Its random weights are its own input channels taken cyclically, so the
    architecture's initialisation scheme is kept.
    """
    name, conv = next(
        ((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), (None, None)
    )
    if conv is None:
        raise ValueError(f"{type(model).__name__} has no Conv2d to adapt to {channels} channels")
    if conv.groups != 1:
        raise ValueError(
            f"the first convolution of {type(model).__name__} is grouped; "
            "it cannot be adapted to other channel counts"
        )
    new = nn.Conv2d(
        channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight[:, torch.arange(channels) % conv.in_channels])
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)
