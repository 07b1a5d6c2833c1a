"""A Transformer encoder classifier: time steps or image patches as tokens (ViT-style).

Its encoder layers are torch's pre-norm `TransformerEncoderLayer` in their computation and
parameter names (`encoder.layers.<i>.self_attn`, `linear1`, `linear2`, `norm1`, `norm2`),
with one difference: the attention's query, key and value are three Linears (`self_attn.q`,
`.k`, `.v`) rather than `nn.MultiheadAttention`'s fused `in_proj_weight`, so that a
tensor-parallel column split gives each rank whole heads (`tensor_parallel_plan`).
Checkpoints of the fused layout still load (`SelfAttention.upgrade_state`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bprun.errors import BprunError
from bprun.models.checkpointing import checkpoint_module
from bprun.models.layers import activation as make_activation
from bprun.models.layers import dropout as make_dropout
from bprun.models.layers import to_sequence

POOLS = ("cls", "mean")


class SelfAttention(nn.Module):
    """Multi-head self-attention as `nn.MultiheadAttention` computes it (and initialises it:
    Xavier-uniform over the stacked q, k, v matrices, zero biases), on `scaled_dot_product_
    attention`. The head count is read from the query's width: under tensor parallelism a
    rank holds heads / tp of them."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.head_dim, self.dropout = dim // heads, dropout
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.out_proj = nn.Linear(dim, dim)
        stacked = torch.empty(3 * dim, dim)
        nn.init.xavier_uniform_(stacked)
        with torch.no_grad():
            for layer, part in zip((self.q, self.k, self.v), stacked.chunk(3), strict=True):
                layer.weight.copy_(part)
                layer.bias.zero_()
            self.out_proj.bias.zero_()

    @staticmethod
    def upgrade_state(state: dict, prefix: str) -> dict:
        """A checkpoint of `nn.MultiheadAttention` (`in_proj_weight`, rows q | k | v) in the
        split layout."""
        for old, kind in (("in_proj_weight", "weight"), ("in_proj_bias", "bias")):
            fused = state.get(prefix + old)
            if fused is not None:
                state = {k: v for k, v in state.items() if k != prefix + old}
                for name, part in zip("qkv", fused.chunk(3), strict=True):
                    state[f"{prefix}{name}.{kind}"] = part
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (
            p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(y.transpose(1, 2).reshape(b, t, -1))


class EncoderLayer(nn.Module):
    """`nn.TransformerEncoderLayer(norm_first=True, batch_first=True)`, its attention split."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float, activation: str):
        super().__init__()
        self.self_attn = SelfAttention(dim, heads, dropout)
        self.linear1 = nn.Linear(dim, hidden)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(hidden, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.activation = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout1(self.self_attn(self.norm1(x)))
        return x + self.dropout2(
            self.linear2(self.dropout(self.activation(self.linear1(self.norm2(x)))))
        )


class Encoder(nn.Module):
    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


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
        self.heads, self.hidden = heads, int(dim * mlp_ratio)
        self.encoder = Encoder(
            [EncoderLayer(dim, heads, self.hidden, dropout, activation) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    @staticmethod
    def tensor_parallel_sizes(settings) -> dict[str, int]:
        """What a tensor-parallel split must divide: the heads and the MLP's width."""
        dim, heads = settings.get("dim", 32), settings.get("heads", 4)
        return {"model.heads": heads, "the MLP width": int(dim * settings.get("mlp_ratio", 2.0))}

    def tensor_parallel_plan(self, tp: int) -> dict[str, str]:
        """Each layer's heads and MLP columns split over `tp` ranks (Megatron's layout); the
        token embedding, positions, norms and the head stay replicated."""
        for what, n in (("model.heads", self.heads), ("the MLP width", self.hidden)):
            if n % tp:
                raise BprunError(
                    f"trainer.tp={tp} does not divide {what}={n}: each rank computes an equal "
                    f"share of it, so use a trainer.tp that divides {n}"
                )
        layer = "encoder.layers.*."
        return {
            **{f"{layer}self_attn.{n}": "colwise" for n in "qkv"},
            f"{layer}self_attn.out_proj": "rowwise",
            f"{layer}linear1": "colwise",
            f"{layer}linear2": "rowwise",
        }

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
