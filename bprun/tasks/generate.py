"""`task=generate ckpt=<run>`: sample text from a trained language model.

The model and its tokenizer come from the checkpoint alone (its config and the tokenizer
saved in it); no data is read. Each sample continues `generate.prompt` by
`generate.max_new_tokens` tokens, drawn at `temperature` within `top_k` / `top_p`, from a
generator seeded by `generate.seed`, with the model's key/value cache. The samples are
printed and written to `samples.txt` in the run folder.
"""

from __future__ import annotations

import logging
import types
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from bprun.build import build_model
from bprun.data.tokenizer import from_state
from bprun.engine import checkpoint as ckpt_io
from bprun.engine.precision import resolve_device
from bprun.errors import BprunError
from bprun.io import atomic_write

log = logging.getLogger("bprun")

SEPARATOR = "\n---------------\n"


def load_language_model(ckpt: str, device: torch.device):
    """(model, tokenizer, checkpoint path) of a language-model run; an error naming the
    fix for any other run."""
    path = ckpt_io.resolve_checkpoint(ckpt, "ckpt")
    state = ckpt_io.load_checkpoint(path)
    extra = state.get("extra") or {}
    fitted = extra.get("data") or {}
    # a classifier of texts keeps a tokenizer too, and its class names
    tok_state = None if "classes" in fitted else fitted.get("tokenizer")
    config = extra.get("config")
    if not config:
        raise BprunError(f"{path} carries no config; it was not written by bprun train")
    saved = OmegaConf.create(config)
    if tok_state is None:
        raise BprunError(
            f"task=generate samples from a language model, and {path} is a "
            f"{saved.dataset.get('_target_', '?')} run with no tokenizer: train one with "
            "dataset=text model=gpt (e.g. experiment=char_gpt_cpu), or use task=eval for this run"
        )
    tokenizer = from_state(tok_state)
    block = int(saved.dataset.get("block_size"))
    shape = types.SimpleNamespace(input_shape=(block,), num_classes=tokenizer.vocab_size)
    model_node = saved.model
    model_node.init_from = None
    model_node.activation_checkpointing = False
    model = build_model(model_node, shape)
    if getattr(model, "encoder", False) or not callable(getattr(model, "generate", None)):
        raise BprunError(
            f"task=generate samples from a language model, and {path} holds a "
            f"{type(model).__name__} classifier: train one with dataset=text model=gpt, or use "
            "task=eval for this run"
        )
    ckpt_io.load_model_state(model, state["model"], path)
    return model.to(device).eval(), tokenizer, path


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] = ()) -> None:
    g = cfg.generate
    if not cfg.get("ckpt"):
        raise BprunError("task=generate needs ckpt=<run folder or .pt file>")
    if g.max_new_tokens < 1 or g.num_samples < 1:
        raise BprunError("generate.max_new_tokens and generate.num_samples must be at least 1")
    if g.temperature < 0 or (g.top_p is not None and not 0 < g.top_p <= 1):
        raise BprunError("generate.temperature must be >= 0 and generate.top_p in (0, 1] (or null)")
    if g.top_k is not None and g.top_k < 1:
        raise BprunError(f"generate.top_k must be at least 1 (or null), got {g.top_k}")
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    device = resolve_device(cfg.trainer.device)
    model, tokenizer, path = load_language_model(cfg.ckpt, device)
    prompt = str(g.prompt)
    unknown = tokenizer.unknown(prompt)
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:10])
        raise BprunError(
            f"generate.prompt holds characters the run's char tokenizer never saw in training "
            f"({shown}): leave them out of the prompt"
        )
    ids = tokenizer.encode(prompt)
    if not ids:
        raise BprunError("generate.prompt encodes to no tokens: give some text")
    idx = torch.tensor([ids] * g.num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(int(g.seed))
    out = model.generate(
        idx,
        int(g.max_new_tokens),
        temperature=float(g.temperature),
        top_k=g.top_k,
        top_p=g.top_p,
        generator=generator,
        use_cache=bool(g.use_cache),
    )
    samples = [tokenizer.decode(row.tolist()) for row in out]
    text = SEPARATOR.join(samples) + "\n"
    print(text, end="", flush=True)
    target = Path(run_dir) / "samples.txt"
    atomic_write(target, lambda f: f.write(text.encode("utf-8")))
    log.info(f"{len(samples)} samples from {path} written to {target}")
    return None
