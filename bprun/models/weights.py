"""Weights from files into a model: safe reads, matching by name and shape, a key report.

Used by `model.weights=<file>` (torchvision and timm state dicts, `.pth`/`.pt`
or `.safetensors`), `model.weights=DEFAULT` (torchvision's weights enum and
torch hub's cache) and `model.init_from=<run folder or .pt>` (another bprun
run's weights, for any model). Tensors whose name and shape match load; a
first-layer convolution whose input channels differ is adapted (timm's
`adapt_input_conv`); everything else keeps the fresh model's initialisation
and is listed in the report, so a replaced head starts from scratch.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from bprun.errors import BprunError
from bprun.io import safe_load

log = logging.getLogger("bprun")

# Below this share of the model's tensors loaded, the file is taken to be for another
# architecture: the run would be training a mostly random network by mistake.
MIN_MATCHED = 0.5
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


@dataclass
class KeyReport:
    """What loading `source` did to the model's state dict."""

    source: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)  # in the model only: freshly initialised
    unexpected: list[str] = field(default_factory=list)  # in the file only: ignored
    mismatched: list[str] = field(default_factory=list)  # other shape: freshly initialised
    adapted: list[str] = field(default_factory=list)  # input channels adapted

    def as_dict(self) -> dict:
        return asdict(self)

    def log(self) -> None:
        log.info(f"weights {self.source}: {self.loaded} tensors loaded")
        for label in ("missing", "unexpected", "mismatched", "adapted"):
            keys = getattr(self, label)
            if keys:
                log.info(f"  {label} ({len(keys)}): {_shorten(keys, 12)}")


def _shorten(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def read_state_dict(path: str | Path, what: str = "model.weights") -> dict[str, torch.Tensor]:
    """A state dict from a `.safetensors` file or a torch file read with weights_only=True.

    A bprun checkpoint gives its `model` entry, a training checkpoint its
    `state_dict` or `model` entry; DDP and torch.compile prefixes are dropped.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise BprunError(
            f"{what}={path}: no such file; give a .pth, .pt or .safetensors state dict"
            + (
                " (model.weights=DEFAULT takes torchvision's own)"
                if what == "model.weights"
                else ""
            )
        )
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise BprunError(
                f"cannot read {what} {path}: not a valid .safetensors file ({str(e)[:120]})"
            ) from None
    else:
        state = safe_load(path, "weights file")
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state:
        raise BprunError(f"{what}={path} holds no state dict (a mapping of names to tensors)")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise BprunError(f"{what}={path} holds no tensors; give a model's state_dict")
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
    return tensors


def adapt_input_conv(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """A conv weight (O, I, kh, kw) for `channels` inputs, as timm adapts RGB stems.

    One channel: the sum over the I inputs (a grey image copied to every input
    channel gives the same output). More: the inputs repeated cyclically and
    scaled by I / channels, which keeps the output's scale.
    """
    dtype, w = weight.dtype, weight.float()
    if channels == 1:
        out = w.sum(dim=1, keepdim=True)
    else:
        index = torch.arange(channels) % w.shape[1]
        out = w[:, index] * (w.shape[1] / channels)
    return out.to(dtype)


def load_matching(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, what: str = "model.weights"
) -> KeyReport:
    """Load the tensors of `state` that fit `model`; report the rest.

    Raises when fewer than half of the model's tensors would load: the file is
    for another architecture, and the mismatched keys are listed.
    """
    own = model.state_dict()
    report = KeyReport(source=source)
    take = {}
    for key, value in state.items():
        target = own.get(key)
        if target is None:
            report.unexpected.append(key)
        elif value.shape == target.shape:
            take[key] = value
        elif _is_channel_mismatch(value, target):
            take[key] = adapt_input_conv(value, target.shape[1])
            report.adapted.append(f"{key} {value.shape[1]}->{target.shape[1]} input channels")
        else:
            report.mismatched.append(f"{key} {tuple(value.shape)}->{tuple(target.shape)}")
    report.missing = [k for k in own if k not in state]
    report.loaded = len(take)
    if len(take) < MIN_MATCHED * len(own):
        parts = [
            f"{label}: {_shorten(keys)}"
            for label, keys in (
                ("missing", report.missing),
                ("unexpected", report.unexpected),
                ("shape", report.mismatched),
            )
            if keys
        ]
        raise BprunError(
            f"{what}={source} does not fit {type(model).__name__}: only {len(take)} of "
            f"{len(own)} tensors match ({'; '.join(parts)}); give weights of the same "
            "architecture, or the model they were saved from"
        )
    model.load_state_dict(take, strict=False)
    return report


def _is_channel_mismatch(value: torch.Tensor, target: torch.Tensor) -> bool:
    """A conv weight that differs only in its input channels (a stem for RGB vs grey)."""
    return (
        value.dim() == 4
        and target.dim() == 4
        and value.shape[0] == target.shape[0]
        and value.shape[2:] == target.shape[2:]
    )


# ---------------------------------------------------------------- torchvision's own weights
def torchvision_weights(name: str, spec: str):
    """The weights enum member named by `spec` (DEFAULT, IMAGENET1K_V1, ResNet18_Weights.X)."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        raise BprunError(
            f"torchvision has no pretrained weights for {name}: give model.weights=<file>"
        ) from None
    member = spec.split(".")[-1]
    if member not in enum.__members__:
        raise BprunError(
            f"model.weights={spec}: {enum.__name__} has {', '.join(['DEFAULT', *enum.__members__])}"
        )
    return enum[member]


def cached_file(weights) -> Path:
    """Where torch hub keeps (or would keep) the file of a torchvision weights entry."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def torchvision_state_dict(weights) -> dict[str, torch.Tensor]:
    """The weights from torch hub's cache, downloaded there first when absent.

    Read with weights_only=True (torch hub's own loader does not by default).
    """
    path = cached_file(weights)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            log.info(f"downloading {weights.url} to {path}")
            hash_prefix = re.search(r"-([a-f0-9]{8,})\.", path.name)
            torch.hub.download_url_to_file(
                weights.url,
                str(path),
                hash_prefix.group(1) if hash_prefix else None,
                progress=False,
            )
        except Exception as e:  # no network, a proxy, a bad hash: all mean "place the file"
            raise BprunError(
                f"cannot download {weights.url} ({type(e).__name__}); without network, "
                f"download it elsewhere and place it at {path} (torch hub's cache, TORCH_HOME)"
            ) from None
    state = read_state_dict(path)
    if "densenet" in weights.url:  # torchvision renames these old keys when it loads them
        pattern = re.compile(
            r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
        )
        state = {
            (f"{m.group(1)}{m.group(2)}" if (m := pattern.match(k)) else k): v
            for k, v in state.items()
        }
    return state
