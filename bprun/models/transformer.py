"""A Transformer encoder classifier: time steps or image patches as tokens (ViT-style)."""

from __future__ import annotations

import torch
from torch import nn

from bprun.models.checkpointing import checkpoint_module
from bprun.models.layers import activation as make_activation
from bprun.models.layers import dropout as make_dropout
from bprun.models.layers import to_sequence

POOLS = ("cls", "mean")


class Transformer(nn.Module):
    """Tokens -> learned positional embedding -> pre-norm encoder -> pooled linear head.

    Tokens: for a sequence (C, L) each of the L time steps is one token of C
    features, projected to `dim`; for an image (C, H, W) each `patch_size`
    square patch is one token, embedded by a Conv2d with stride `patch_size`
    (ViT's patch embedding). `pool=cls` reads a learned class token, `pool=mean`
    averages all tokens. `dropout` acts on the embedded tokens and inside every
    encoder layer.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        dim: int = 32,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
        patch_size: int = 4,
        pool: str = "mean",
        activation: str = "gelu",
    ):
        super().__init__()
        shape = tuple(input_shape)
        if pool not in POOLS:
            raise ValueError(f"unknown model.pool '{pool}': choose one of {', '.join(POOLS)}")
        if dim % heads:
            raise ValueError(
                f"model.dim={dim} is not divisible by model.heads={heads}: "
                "pick a dim that is a multiple of heads"
            )
        if len(shape) == 2:
            tokens = shape[1]
            self.embed: nn.Module = nn.Linear(shape[0], dim)
        elif len(shape) == 3:
            _, height, width = shape
            if patch_size < 1 or height % patch_size or width % patch_size:
                sides = [p for p in range(1, min(height, width) + 1) if not height % p | width % p]
                raise ValueError(
                    f"model.patch_size={patch_size} does not tile {height}x{width} images: "
                    f"choose one of {', '.join(map(str, sides))}"
                )
            tokens = (height // patch_size) * (width // patch_size)
            self.embed = nn.Conv2d(shape[0], dim, patch_size, stride=patch_size)
        else:
            raise ValueError(
                f"model=transformer needs sequences (C, L) or images (C, H, W), got inputs "
                f"shaped {shape}: use model=mlp or model=logreg for flat feature vectors"
            )
        self.pool = pool
        self.dropout = make_dropout(dropout)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos = nn.Parameter(torch.zeros(1, tokens + (pool == "cls"), dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        if self.cls is not None:
            nn.init.trunc_normal_(self.cls, std=0.02)
        layer = nn.TransformerEncoderLayer(
            dim,
            heads,
            dim_feedforward=int(dim * mlp_ratio),
            dropout=dropout,
            activation=make_activation(activation),
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def enable_activation_checkpointing(self) -> int:
        for layer in self.encoder.layers:
            checkpoint_module(layer)
        return len(self.encoder.layers)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(N, tokens, dim) embeddings of a batch, class token first when pool=cls."""
        if x.dim() == 4:
            t = self.embed(x).flatten(2).transpose(1, 2)
        else:
            t = self.embed(to_sequence(x))
        if self.cls is not None:
            t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1)
        return self.dropout(t + self.pos)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.encoder(self.tokens(x)))
        return self.head(h[:, 0] if self.pool == "cls" else h.mean(1))
