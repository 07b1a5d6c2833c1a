"""A decoder-only transformer language model in the manner of nanoGPT (GPT-2's design).

Pre-LayerNorm blocks, causal `scaled_dot_product_attention` (flash or memory-efficient
kernels where the device has them), learned positions or rotary ones (`rope=True`), the
input embedding tied to the output layer, and GPT-2's initialisation: N(0, 0.02) weights,
zero biases, and the residual projections scaled by 1/sqrt(2 n_layer).

Layout for sharding plans: the blocks are `blocks` (an `nn.ModuleList`); each has
`attn.q`, `attn.k`, `attn.v` (column-parallel) and `attn.proj` (row-parallel), `mlp.fc`
(column-parallel) and `mlp.proj` (row-parallel): `tensor_parallel_plan`. The query, key and
value are three Linears, not one fused one, so that a column split gives each rank whole heads
of each; checkpoints of the fused layout (`attn.qkv`) still load (`upgrade_state`).

`generate` samples with a key/value cache: the prompt is read once, and each new token
costs one position, not the whole context.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bprun.errors import BprunError


class Rotary(nn.Module):
    """Rotary position embedding (RoFormer) of the query and key heads."""

    def __init__(self, head_dim: int, block_size: int, base: float = 10000.0):
        super().__init__()
        inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        t = x.shape[-2]
        cos = self.cos[pos : pos + t].to(x.dtype)
        sin = self.sin[pos : pos + t].to(x.dtype)
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, rotary=None):
        super().__init__()
        self.head_dim, self.dropout = n_embd // n_head, dropout
        self.q = nn.Linear(n_embd, n_embd, bias=bias)
        self.k = nn.Linear(n_embd, n_embd, bias=bias)
        self.v = nn.Linear(n_embd, n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.rotary = [rotary]  # shared by the blocks; a list keeps it out of the submodules

    @staticmethod
    def upgrade_state(state: dict, prefix: str) -> dict:
        """A checkpoint of the fused projection (`qkv`, rows q | k | v) in the split layout."""
        for kind in ("weight", "bias"):
            fused = state.get(f"{prefix}qkv.{kind}")
            if fused is not None:
                state = {k: v for k, v in state.items() if k != f"{prefix}qkv.{kind}"}
                for name, part in zip("qkv", fused.chunk(3), strict=True):
                    state[f"{prefix}{name}.{kind}"] = part
        return state

    def forward(self, x: torch.Tensor, cache=None, pos: int = 0, mask=None) -> torch.Tensor:
        b, t, _ = x.shape
        # The head count is read from the projections' width: under tensor parallelism each
        # rank holds n_head / tp of the heads, and its q, k and v only their columns.
        q, k, v = (
            z(x).view(b, t, -1, self.head_dim).transpose(1, 2) for z in (self.q, self.k, self.v)
        )
        rotary = self.rotary[0]
        if rotary is not None:
            q, k = rotary(q, pos), rotary(k, pos)
        if cache is not None:  # (keys, values) of shape (B, H, block_size, head_dim)
            cache[0][:, :, pos : pos + t] = k
            cache[1][:, :, pos : pos + t] = v
            k, v = cache[0][:, :, : pos + t], cache[1][:, :, : pos + t]
        # A cache step (one query) attends to every earlier position; a prompt read in one go
        # (always from position 0) is causal.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,  # an encoder's padding mask (then not causal)
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=t > 1 and mask is None,
        )
        y = y.transpose(1, 2).contiguous().view(b, t, -1)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, rotary=None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias, rotary)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor, cache=None, pos: int = 0, mask=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, pos, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """`num_classes` is the vocabulary; `block_size` the positions (None: the data's
    context, `input_shape[0]`).

    Given `vocab_size` (token-id inputs of a classification dataset) it is an encoder
    instead: attention over every position but the padding (`pad_id`), the final states
    averaged over the text's tokens (`pool=mean`) or the first token's taken (`pool=first`),
    and a linear head to `num_classes` outputs."""

    reads = "tokens"  # token ids in (what bprun.build checks before building)

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        n_layer: int = 6,
        n_head: int = 6,
        n_embd: int = 384,
        block_size: int | None = None,
        dropout: float = 0.0,
        bias: bool = False,
        rope: bool = False,
        vocab_size: int | None = None,
        pad_id: int | None = None,
        pool: str = "mean",
    ):
        super().__init__()
        self.encoder, self.pad_id, self.pool = vocab_size is not None, pad_id, pool
        if pool not in ("mean", "first"):
            raise BprunError(f"model.pool={pool} is not known: use mean or first")
        classes = num_classes
        if self.encoder:
            num_classes = vocab_size
        context = int(input_shape[0]) if input_shape else 0
        block_size = int(block_size or context)
        if context > block_size:
            raise BprunError(
                f"dataset.block_size={context} is larger than the model's positions "
                f"(model.block_size={block_size}): lower dataset.block_size or raise "
                "model.block_size (or leave it null: the data's)"
            )
        if n_embd % n_head or (rope and (n_embd // n_head) % 2):
            raise BprunError(
                f"model.n_embd={n_embd} must be a multiple of model.n_head={n_head}"
                + (" with an even head width (for rope)" if rope else "")
            )
        if num_classes < 1:
            raise BprunError("model=gpt needs a vocabulary: use it with dataset=text")
        self.block_size, self.vocab_size = block_size, num_classes
        self.n_layer, self.n_head, self.n_embd = n_layer, n_head, n_embd
        self.local_heads = n_head  # the heads this process computes (n_head / tp under TP)
        self.wte = nn.Embedding(num_classes, n_embd)
        self.wpe = None if rope else nn.Embedding(block_size, n_embd)
        rotary = Rotary(n_embd // n_head, block_size) if rope else None
        self.rotary = rotary
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(n_embd, n_head, dropout, bias, rotary) for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        if self.encoder:
            self.head = nn.Linear(n_embd, classes)
        else:
            self.lm_head = nn.Linear(n_embd, num_classes, bias=False)
            self.lm_head.weight = self.wte.weight  # tied input and output embeddings
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # the residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, caches=None, pos: int = 0) -> torch.Tensor:
        """Logits (B, T, vocab) of the next token at every position of `idx` (B, T)."""
        t = idx.shape[1]
        if pos + t > self.block_size:
            raise BprunError(
                f"{pos + t} tokens exceed the model's {self.block_size} positions "
                "(model.block_size)"
            )
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(pos, pos + t, device=idx.device))
        x = self.drop(x)
        if self.encoder:
            return self._encode(idx, x)
        for i, block in enumerate(self.blocks):
            x = block(x) if caches is None else block(x, caches[i], pos)
        return self.lm_head(self.ln_f(x))

    def _encode(self, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        keep = torch.ones_like(idx, dtype=torch.bool) if self.pad_id is None else idx != self.pad_id
        keep[:, 0] = True  # an empty text still attends to something
        mask = keep[:, None, None, :]  # (B, 1, 1, T): which keys each query may read
        for block in self.blocks:
            x = block(x, None, 0, mask)
        x = self.ln_f(x)
        if self.pool == "first":
            return self.head(x[:, 0])
        w = keep.unsqueeze(-1).to(x.dtype)
        return self.head((x * w).sum(1) / w.sum(1))

    @staticmethod
    def tensor_parallel_sizes(settings) -> dict[str, int]:
        """What a tensor-parallel split must divide (the MLP and the width follow the heads)."""
        return {"model.n_head": settings.get("n_head", 6)}

    def tensor_parallel_plan(self, tp: int) -> dict[str, str]:
        """Each block's heads and MLP columns split over `tp` ranks (Megatron's layout); the
        embeddings, norms and the tied output layer stay replicated. From then on a rank
        computes (and caches the keys and values of) n_head / tp heads."""
        if self.n_head % tp:
            raise BprunError(
                f"trainer.tp={tp} does not divide model.n_head={self.n_head}: each rank computes "
                f"an equal share of it, so use a trainer.tp that divides {self.n_head}"
            )
        self.local_heads = self.n_head // tp
        return {
            "blocks.*.attn.q": "colwise",
            "blocks.*.attn.k": "colwise",
            "blocks.*.attn.v": "colwise",
            "blocks.*.attn.proj": "rowwise",
            "blocks.*.mlp.fc": "colwise",
            "blocks.*.mlp.proj": "rowwise",
        }

    def new_cache(self, batch: int, device, dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (batch, self.local_heads, self.block_size, self.n_embd // self.n_head)
        return [
            (
                torch.empty(shape, device=device, dtype=dtype),
                torch.empty(shape, device=device, dtype=dtype),
            )
            for _ in self.blocks
        ]

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """`idx` (B, T) followed by `max_new_tokens` sampled tokens.

        With the cache, a context that fills the model's positions is cut to its last half
        and read again (one pass per block_size / 2 new tokens); without it, every token
        recomputes the last `block_size` tokens, as nanoGPT's `generate` does."""
        was_training = self.training
        self.eval()
        out = idx
        block = self.block_size
        if not use_cache:
            for _ in range(max_new_tokens):
                logits = self(out[:, -block:])[:, -1]
                out = torch.cat([out, sample(logits, temperature, top_k, top_p, generator)], 1)
            self.train(was_training)
            return out
        dtype = self.wte.weight.dtype
        if torch.is_autocast_enabled(idx.device.type):
            dtype = torch.get_autocast_dtype(idx.device.type)
        caches = self.new_cache(idx.shape[0], idx.device, dtype)
        context = out[:, -block:]
        logits, pos = self(context, caches, 0)[:, -1], context.shape[1]
        for i in range(max_new_tokens):
            token = sample(logits, temperature, top_k, top_p, generator)
            out = torch.cat([out, token], 1)
            if i + 1 == max_new_tokens:
                break
            if pos >= block:  # the positions are full: keep the last half and read it again
                context = out[:, -max(1, block // 2) :]
                logits, pos = self(context, caches, 0)[:, -1], context.shape[1]
            else:
                logits, pos = self(token, caches, pos)[:, -1], pos + 1
        self.train(was_training)
        return out


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of `logits` (B, V): greedy at temperature 0, else drawn from the
    softmax at `temperature`, kept to the `top_k` likeliest and to the smallest set whose
    probability reaches `top_p` (nucleus sampling)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the likelier ones alone already reach top_p
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)
