"""Per-tensor norms in a few kernels: `torch._foreach_norm` over a list, stacked into one vector.

One vector per call means one host read when the caller wants the numbers,
whatever the number of layers.
"""

from __future__ import annotations

import torch
from torch import nn


def stacked_norms(tensors: list[torch.Tensor], ord: float = 2.0) -> torch.Tensor:
    """The `ord`-norm of every tensor, as one float32 vector on the tensors' device."""
    return torch.stack(torch._foreach_norm(tensors, ord)).float()


def grads(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """The gradients of `params`; a parameter without one (unused this update) counts as zero."""
    out = []
    for p in params:
        g = p.grad
        out.append(g.detach() if g is not None else p.new_zeros(()))
    return out


def named_trainable(module: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
    """(names, parameters) of the parameters that train, in the module's order."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def is_weight(p: torch.Tensor) -> bool:
    """Weight matrices and kernels: what the gradient-flow chart and the watch look at.
    Biases and normalisation scales (1-D) follow their layer and would crowd the picture."""
    return p.dim() >= 2
