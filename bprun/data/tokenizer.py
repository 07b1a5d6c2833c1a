"""Tokenizers for text: characters, bytes, a byte-level BPE, a `tokenizer.json`, GPT-2's.

Each one is `encode(str) -> list[int]`, `decode(ids) -> str`, `vocab_size`, and `state()`:
plain values (a string, a list) from which `from_state` rebuilds it exactly. The state goes
into the dataset cache, every checkpoint and the run folder, so a resumed run, `task=generate`
and `task=eval` read text exactly as training did, with no file outside the run.

- `char`: the characters of the training split (nanoGPT's character-level Shakespeare);
- `byte`: the 256 byte values of the UTF-8 encoding;
- `bpe`: a byte-level BPE trained on the training split with Hugging Face `tokenizers`;
- a path to a `tokenizer.json` (Hugging Face's format);
- `gpt2`: tiktoken's GPT-2 encoding, read from tiktoken's local cache only (no download).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from bprun.errors import BprunError

NAMED = ("char", "byte", "bpe", "gpt2")
BYTE_ALPHABET = 256
INSTALL = "pip install 'bprun[lm]'"


class Tokenizer:
    kind = ""
    vocab_size = 0

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def state(self) -> dict:
        raise NotImplementedError

    def unknown(self, text: str) -> list[str]:
        """Characters of `text` this tokenizer cannot encode (none but for `char`)."""
        return []

    def save(self, path: Path) -> None:
        save_state(self.state(), path)


class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, chars: str):
        self.chars = chars
        self.vocab_size = len(chars)
        self.index = {c: i for i, c in enumerate(chars)}
        # Code point -> id as a lookup table: encoding a corpus is one numpy gather.
        self.table = np.full(max(map(ord, chars), default=0) + 1, -1, dtype=np.int64)
        for i, c in enumerate(chars):
            self.table[ord(c)] = i

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        return cls("".join(sorted(seen)))

    def encode_array(self, text: str) -> np.ndarray:
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.where(
            points < len(self.table), self.table[np.minimum(points, len(self.table) - 1)], -1
        )
        return ids[ids >= 0]  # characters never seen in training are dropped (see `unknown`)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def unknown(self, text: str) -> list[str]:
        return sorted({c for c in text if c not in self.index})

    def state(self) -> dict:
        return {"kind": "char", "chars": self.chars}


class ByteTokenizer(Tokenizer):
    kind = "byte"
    vocab_size = BYTE_ALPHABET

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def state(self) -> dict:
        return {"kind": "byte"}


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers.Tokenizer` (a trained BPE, or a tokenizer.json)."""

    kind = "hf"

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def from_json(cls, text: str) -> HFTokenizer:
        return cls(_tokenizers().Tokenizer.from_str(text))

    @classmethod
    def train_bpe(cls, texts: list[str], vocab_size: int) -> HFTokenizer:
        if vocab_size < BYTE_ALPHABET:
            raise BprunError(
                f"dataset.vocab_size={vocab_size} is below the byte alphabet a byte-level BPE "
                f"starts from ({BYTE_ALPHABET}): use dataset.vocab_size={BYTE_ALPHABET} or more "
                "(or dataset.tokenizer=byte)"
            )
        tk = _tokenizers()
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once: `tokenizers` encodes them in parallel (Rust threads)."""
        return [e.ids for e in self.tok.encode_batch(texts)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids])

    def hf_json(self) -> str:
        return self.tok.to_str()

    def state(self) -> dict:
        return {"kind": "hf", "json": self.hf_json()}


class TiktokenTokenizer(Tokenizer):
    kind = "tiktoken"

    def __init__(self, name: str = "gpt2"):
        try:
            import tiktoken
        except ImportError:
            raise BprunError(f"dataset.tokenizer=gpt2 needs tiktoken: run {INSTALL}") from None
        missing = [(url, path) for url, path in tiktoken_files(name) if not path.is_file()]
        if missing:
            url, path = missing[0]
            raise BprunError(
                f"dataset.tokenizer={name} reads tiktoken's file {url} from its local cache, "
                f"which lacks it (no download here): place that file at {path} "
                "(or set TIKTOKEN_CACHE_DIR to a folder holding it), or use "
                "dataset.tokenizer=bpe"
            )
        self.name = name
        self.enc = tiktoken.get_encoding(name)
        self.vocab_size = self.enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.enc.decode([int(i) for i in ids])

    def state(self) -> dict:
        return {"kind": "tiktoken", "name": self.name}


GPT2_FILES = (
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
)


def tiktoken_files(name: str) -> list[tuple[str, Path]]:
    """(url, cached path) of each file tiktoken's encoding `name` reads, where tiktoken's
    `read_file_cached` looks for it: a folder named by TIKTOKEN_CACHE_DIR, DATA_GYM_CACHE_DIR
    or <tmp>/data-gym-cache, the file named by the SHA-1 of its URL."""
    if name != "gpt2":
        raise BprunError(f"dataset.tokenizer={name}: of tiktoken's encodings bprun reads gpt2")
    folder = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    folder = Path(folder or Path(tempfile.gettempdir()) / "data-gym-cache")
    return [(url, folder / hashlib.sha1(url.encode()).hexdigest()) for url in GPT2_FILES]


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise BprunError(f"this tokenizer needs Hugging Face tokenizers: run {INSTALL}") from None
    return tokenizers


def save_state(state: dict, path: Path) -> None:
    """A tokenizer's state as a file a user can load again: Hugging Face's tokenizer.json
    for the BPE and tokenizer.json kinds (`dataset.tokenizer=<path>` reads it), bprun's own
    JSON for the others."""
    from bprun.io import atomic_write

    text = state["json"] if state.get("kind") == "hf" else json.dumps(state)
    atomic_write(path, lambda f: f.write(text.encode()))


def from_state(state: dict) -> Tokenizer:
    kind = state.get("kind")
    if kind == "char":
        return CharTokenizer(state["chars"])
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        return HFTokenizer.from_json(state["json"])
    if kind == "tiktoken":
        return TiktokenTokenizer(state["name"])
    raise BprunError(f"the saved tokenizer is of an unknown kind ({kind!r}): retrain the run")


def spec_of(name: str, vocab_size: int | None) -> dict:
    """What decides the tokenizer before any text is read: part of the cache key."""
    if name in ("char", "byte", "gpt2"):
        return {"tokenizer": name}
    if name == "bpe":
        if vocab_size is None:
            raise BprunError("dataset.tokenizer=bpe needs dataset.vocab_size (e.g. 4096)")
        if vocab_size < BYTE_ALPHABET:
            HFTokenizer.train_bpe([], vocab_size)  # raises with the fix
        return {"tokenizer": "bpe", "vocab_size": int(vocab_size)}
    path = Path(name).expanduser()
    if not path.is_file():
        raise BprunError(
            f"dataset.tokenizer={name} is none of {', '.join(NAMED)} and no such file: give one "
            "of those or the path of a tokenizer.json"
        )
    text = path.read_text(encoding="utf-8")
    return {"tokenizer": "json", "sha1": hashlib.sha1(text.encode()).hexdigest(), "path": str(path)}


def build(spec: dict, train_texts: list[str]) -> Tokenizer:
    """The tokenizer `spec` names, trained on `train_texts` where it learns from text."""
    name = spec["tokenizer"]
    if name == "char":
        return CharTokenizer.train(train_texts)
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return TiktokenTokenizer("gpt2")
    if name == "bpe":
        return HFTokenizer.train_bpe(train_texts, spec["vocab_size"])
    try:
        return HFTokenizer.from_json(Path(spec["path"]).read_text(encoding="utf-8"))
    except BprunError:
        raise
    except Exception as e:
        raise BprunError(
            f"dataset.tokenizer={spec['path']} is not a tokenizer.json Hugging Face tokenizers "
            f"can read ({str(e).splitlines()[0]}): give a tokenizer.json saved by tokenizers"
        ) from None
