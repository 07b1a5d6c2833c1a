"""torchvision's ResNets, adapted to the dataset's channel count and image size."""

from __future__ import annotations

import torchvision
from torch import nn

from bprun.models.layers import activation as make_activation

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def resnet(
    input_shape: tuple[int, ...],
    num_classes: int,
    arch: str = "resnet18",
    small_input: bool = True,
    activation: str = "relu",
) -> nn.Module:
    """A randomly initialised torchvision ResNet for (C, H, W) images.

    The first conv takes the input's C channels (1 for MNIST, 3 for CIFAR).
    `small_input=True` swaps the ImageNet stem (7x7 conv stride 2, then a
    3x3 max-pool: 4x downsampling) for a 3x3 conv at stride 1 with no
    max-pool, the usual stem for 28-32 px images. `activation` replaces every
    ReLU in the net.
    """
    if len(input_shape) != 3:
        raise ValueError(
            f"model=resnet needs images shaped (C, H, W), got inputs shaped {tuple(input_shape)}: "
            "use model=cnn, gru, lstm or transformer for sequences (C, L), "
            "and model=mlp for flat feature vectors"
        )
    if arch not in ARCHS:
        raise ValueError(f"unknown model.arch '{arch}': choose one of {', '.join(ARCHS)}")
    make_activation(activation)  # an unknown name fails here, listing the choices
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    channels = input_shape[0]
    if small_input:
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif channels != 3:
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    if activation != "relu":
        _replace_relu(model, activation)
    return model


def _replace_relu(module: nn.Module, activation: str) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, make_activation(activation))
        else:
            _replace_relu(child, activation)
