"""Language modelling: predict the next token at every position of a window.

The model gives logits (B, T, vocab) for targets (B, T) (the window shifted by one). The
loss is the mean cross-entropy per token, in nats; the metrics derive from it:
- `ppl`: perplexity, exp(loss);
- `bpb`: bits per byte, loss / ln 2 x (tokens / UTF-8 bytes of the split), which does not
  depend on the tokenizer, so char, byte and BPE models compare on it.

At every validation, a run with a folder logs a sample of the model's text to TensorBoard's
text tab (`SampleText`).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from bprun.errors import BprunError
from bprun.problems import KINDS
from bprun.problems.base import Evaluation, Problem

log = logging.getLogger("bprun")


class FlatTokens(nn.Module):
    """`loss(logits (B, T, V), targets (B, T))` as the loss of B*T single-token predictions."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(out.reshape(-1, out.shape[-1]), y.reshape(-1))


class LanguageModel(Problem):
    kind = "lm"
    loss_kind = "classification"
    names = KINDS["lm"][1]

    def __init__(self, num_classes: int = 0, metrics=None, classes=None, tokens_per_byte=None):
        super().__init__(num_classes, metrics, classes)
        self.tokens_per_byte = dict(tokens_per_byte or {})  # split -> tokens per UTF-8 byte

    @classmethod
    def from_data(cls, dataset, **settings) -> LanguageModel:
        streams = dataset.streams
        ratios = {}
        if streams is not None:
            ratios = {s: streams.tokens_per_byte(s) for s in ("val", "test")}
        return cls(num_classes=dataset.num_classes, tokens_per_byte=ratios, **settings)

    def describe_kind(self) -> str:
        return f"language model ({self.num_classes} tokens)"

    def default_loss(self) -> nn.Module:
        from bprun.losses import CrossEntropyLoss

        return CrossEntropyLoss()

    def criterion(self, loss: nn.Module) -> nn.Module:
        return FlatTokens(loss)

    def check_data(self, dataset) -> None:
        if dataset.streams is None:
            raise BprunError(
                "problem=lm needs token streams: use dataset=text dataset.path=<your text>"
            )

    def finish(self, values: dict, evaluation: Evaluation) -> dict[str, float]:
        loss = float(values["loss"])
        out = {"loss": loss}
        if "ppl" in self.selected:
            out["ppl"] = math.exp(min(loss, 700.0))
        split = "test" if evaluation.prefix.startswith("test") else "val"
        ratio = self.tokens_per_byte.get(split)
        if "bpb" in self.selected and ratio:
            out["bpb"] = loss / math.log(2) * ratio
        return out

    def callbacks(self, dataset, settings, run_dir) -> list:
        streams = dataset.streams
        if run_dir is None or streams is None:
            return []
        return [SampleText(streams.tokenizer)]


class SampleText:
    """At every validation, a sample of the model's text (from a newline, 200 new tokens,
    its own seeded generator so training's random streams are untouched) in TensorBoard's
    text tab.

    Sharded weights (FSDP, tensor parallelism) are gathered in each forward pass, which every
    rank must run: there every rank samples, in step (one seed, so the same tokens), without
    the KV cache (whose layout assumes whole heads), and the writing rank writes."""

    def __init__(self, tokenizer, max_new_tokens: int = 200, seed: int = 0):
        self.tokenizer, self.max_new_tokens, self.seed = tokenizer, max_new_tokens, seed

    def on_validation(self, trainer, metrics: dict, val_loader) -> None:
        model = trainer.module
        sharded = getattr(trainer, "sharded", False)
        if not hasattr(model, "generate") or (trainer.tracker is None and not sharded):
            return
        ids = self.tokenizer.encode("\n") or [0]
        idx = torch.tensor([ids[-1:]], dtype=torch.long, device=trainer.device)
        g = torch.Generator(device=trainer.device).manual_seed(self.seed)
        out = model.generate(
            idx, self.max_new_tokens, temperature=1.0, generator=g, use_cache=not sharded
        )
        if trainer.tracker is not None:
            text = self.tokenizer.decode(out[0].tolist())
            trainer.tracker.text("sample", "```\n" + text + "\n```", trainer.update)
