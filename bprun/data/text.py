"""`dataset=text`: your own text as token streams for a language model.

`dataset.path` is a file, a folder (its .txt files, recursively) or a glob; with none, the
embedded corpus: the help texts of Python's standard library (`pydoc_data.topics`, about
0.47 MB of English prose that ships with every Python), so trials and tests need no download.

The split is by position: of each file, the first part trains, the next `val_fraction`
validates and the last `test_fraction` tests (nanoGPT's 90/10 split with the defaults).

The text is encoded once into one flat array of token ids per split, written as uint16 (or
uint32 for vocabularies past 65,536) under `<data_dir>/text/<key>/`, the key a hash of the
files' bytes, the tokenizer and the split. Later runs and sweeps memory-map those files, so a
corpus larger than memory trains without being loaded (`bprun.data.windows`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bprun.data import tokenizer as tokenizers
from bprun.data.sources import Dataset
from bprun.errors import BprunError

log = logging.getLogger("bprun")

SPLITS = ("train", "val", "test")
CACHE_VERSION = 1


@dataclass
class TokenStreams:
    """Each split's token ids (memory-mapped arrays) and what reading them needs."""

    tokens: dict[str, np.ndarray]
    block_size: int
    tokenizer: tokenizers.Tokenizer
    nbytes: dict[str, int] = field(default_factory=dict)  # UTF-8 bytes of each split's text

    def tokens_per_byte(self, split: str) -> float | None:
        n, b = len(self.tokens[split]), self.nbytes.get(split, 0)
        return n / b if b else None


def embedded_corpus() -> str:
    """The standard library's help topics, in their (sorted) order: plain English prose."""
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def text_files(path: str) -> list[Path]:
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        if not files:
            raise BprunError(f"dataset.path={path} holds no .txt files: add some or name a file")
        return files
    files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
    if not files:
        raise BprunError(
            f"dataset.path={path}: no such file or folder, and no file matches it as a glob"
        )
    return files


def read_text(path: Path) -> str:
    """A file's text (UTF-8); an empty, binary or undecodable file is an error naming the
    file and the byte offset."""
    data = path.read_bytes()
    if not data.strip():
        raise BprunError(f"{path} is empty: remove it from dataset.path or add text to it")
    nul = data.find(b"\0")
    if nul >= 0:
        raise BprunError(
            f"{path} is a binary file (a NUL byte at offset {nul}), not text: remove it from "
            "dataset.path (a folder is read for its .txt files; a glob such as '<dir>/*.txt' "
            "picks text files)"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BprunError(
            f"{path} is not UTF-8 text: byte offset {e.start} ({data[e.start : e.start + 1]!r}) "
            "cannot be decoded; convert it (iconv -f <its encoding> -t utf-8) or remove it"
        ) from None


def split_text(text: str, val_fraction: float, test_fraction: float) -> tuple[str, str, str]:
    n = len(text)
    n_val, n_test = int(n * val_fraction), int(n * test_fraction)
    a, b = n - n_val - n_test, n - n_test
    return text[:a], text[a:b], text[b:]


def load_text(
    path: str | None = None,
    tokenizer: str = "char",
    vocab_size: int | None = None,
    block_size: int = 256,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    data_dir: str = "data",
    state: dict | None = None,
) -> Dataset:
    """The token streams of the text at `path` (None: the embedded corpus).

    `state`: a checkpoint's record of the tokenizer (and the cache key); its tokenizer is
    reused as it is, never retrained."""
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise BprunError(f"dataset.{key} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1:
        raise BprunError(
            f"dataset.val_fraction + dataset.test_fraction = {val_fraction + test_fraction} "
            "leaves no training text: lower them"
        )
    if not isinstance(block_size, int) or block_size < 1:
        raise BprunError(f"dataset.block_size must be a whole number >= 1, got {block_size}")
    files = text_files(path) if path else []
    spec = (state or {}).get("spec") or tokenizers.spec_of(str(tokenizer), vocab_size)
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_VERSION, spec, val_fraction, test_fraction]).encode())
    texts: list[str] | None = None
    if files:
        for f in files:
            with open(f, "rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 22), b""):
                    digest.update(chunk)
            digest.update(b"\0file\0")
    else:
        texts = [embedded_corpus()]
        digest.update(texts[0].encode())
    if state and state.get("tokenizer"):
        digest.update(json.dumps(state["tokenizer"], sort_keys=True).encode())
    key = digest.hexdigest()[:20]
    folder = Path(data_dir) / "text" / key
    streams = _open_cache(folder, block_size)
    if streams is None:
        if texts is None:
            texts = [read_text(f) for f in files]
        streams = _encode(texts, spec, state, val_fraction, test_fraction, folder, block_size)
    _check_lengths(streams, block_size, val_fraction)
    tok = streams.tokenizer
    shape = torch.zeros(0, block_size, dtype=torch.long)
    return Dataset(
        x_train=shape,
        y_train=shape,
        x_test=shape,
        y_test=shape,
        num_classes=tok.vocab_size,
        problem="lm",
        state={"tokenizer": tok.state(), "spec": spec, "key": key},
        streams=streams,
    )


def _check_lengths(streams: TokenStreams, block_size: int, val_fraction: float) -> None:
    need = block_size + 1
    n_train, n_val = len(streams.tokens["train"]), len(streams.tokens["val"])
    if n_train < need:
        raise BprunError(
            f"the training split holds {n_train} tokens, fewer than dataset.block_size + 1 = "
            f"{need}: lower dataset.block_size or give more text"
        )
    if val_fraction > 0 and n_val < need:
        raise BprunError(
            f"the validation split holds {n_val} tokens, fewer than dataset.block_size + 1 = "
            f"{need}: raise dataset.val_fraction (now {val_fraction}), lower dataset.block_size "
            "or give more text"
        )


def _open_cache(folder: Path, block_size: int) -> TokenStreams | None:
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        tokens = {}
        for s in SPLITS:
            n = meta["lengths"][s]
            tokens[s] = (
                np.memmap(folder / f"{s}.bin", dtype=dtype, mode="r", shape=(n,))
                if n
                else np.zeros(0, dtype)
            )
        tok = tokenizers.from_state(meta["tokenizer"])
    except BprunError:
        raise
    except Exception:  # a damaged cache is rebuilt, never trusted
        return None
    log.info(f"token cache {folder}: {meta['lengths']['train']:,} training tokens")
    return TokenStreams(tokens, block_size, tok, meta["nbytes"])


def _encode(
    texts: list[str],
    spec: dict,
    state: dict | None,
    val_fraction: float,
    test_fraction: float,
    folder: Path,
    block_size: int,
) -> TokenStreams:
    """Split each text by position, train or load the tokenizer, encode, write the cache."""
    from tqdm import tqdm

    parts = [split_text(t, val_fraction, test_fraction) for t in texts]
    by_split = {s: [p[i] for p in parts if p[i]] for i, s in enumerate(SPLITS)}
    if state and state.get("tokenizer"):
        tok = tokenizers.from_state(state["tokenizer"])
    else:
        tok = tokenizers.build(spec, by_split["train"])
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32)
    tmp = folder.with_name(f"{folder.name}.partial{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lengths, nbytes, dropped = {}, {}, 0
    for s in SPLITS:
        pieces = by_split[s]
        nbytes[s] = sum(len(p.encode("utf-8")) for p in pieces)
        if isinstance(tok, tokenizers.HFTokenizer):  # parallel over the pieces, in Rust
            arrays = [np.asarray(ids, dtype=np.int64) for ids in tok.encode_batch(pieces)]
        else:
            arrays = [
                tok.encode_array(p)
                for p in tqdm(pieces, desc=f"encoding {s}", unit="file", disable=len(pieces) < 50)
            ]
        dropped += (
            sum(len(p) for p in pieces) - sum(len(a) for a in arrays) if tok.kind == "char" else 0
        )
        flat = np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)
        flat.tofile(tmp / f"{s}.bin")
        lengths[s] = len(flat)
    if dropped:
        log.warning(
            f"{dropped} characters of the validation and test splits never occur in the training "
            "split, so the char tokenizer has no id for them: they are left out"
        )
    meta = {
        "version": CACHE_VERSION,
        "dtype": dtype.name,
        "lengths": lengths,
        "nbytes": nbytes,
        "spec": spec,
        "tokenizer": tok.state(),
    }
    (tmp / "meta.json").write_text(json.dumps(meta))
    if folder.exists() and not (folder / "meta.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)  # a damaged cache
    try:
        tmp.rename(folder)  # the cache appears whole or not at all
    except OSError:  # another run (a sweep's job) wrote the same cache first
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(f"encoded {lengths['train']:,} training tokens into {folder}")
    opened = _open_cache(folder, block_size)
    assert opened is not None
    return opened
