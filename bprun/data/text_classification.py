"""`dataset=text_classification`: a table of texts and their labels (sentiment, topic).

`dataset.path` is a CSV or Parquet file, `dataset.text` the column of texts and
`dataset.target` the column of labels. The tokenizers are `dataset=text`'s (char, byte, bpe,
a tokenizer.json, gpt2), trained on the training rows. Each text becomes `block_size` token
ids, cut at the end or padded with one extra id (`vocab_size`, the last), which the models
mask out (`Dataset.pad_id`). A test split is carved at random (`test_fraction`), validation
by bprun (`dataset.val_fraction`). The tokenizer and the label names are the source's state,
kept in checkpoints, so eval and resume read text exactly as training did.
"""

from __future__ import annotations

import numpy as np
import torch

from bprun.data import tokenizer as tokenizers
from bprun.data.sources import Dataset, carve
from bprun.data.table import read_table
from bprun.errors import BprunError


def load_text_classification(
    path: str | None = None,
    text: str = "text",
    target: str = "label",
    tokenizer: str = "char",
    vocab_size: int | None = None,
    block_size: int = 128,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    state: dict | None = None,
) -> Dataset:
    frame = read_table(path)
    for key, column in (("text", text), ("target", target)):
        if column not in frame.columns:
            raise BprunError(
                f"dataset.{key}={column} is not a column of {path}: choose one of "
                f"{', '.join(map(str, frame.columns))}"
            )
    if frame[text].isna().any():
        row = int(np.flatnonzero(frame[text].isna().to_numpy())[0])
        raise BprunError(f"column '{text}' of {path} is empty in row {row + 2}: fill or drop it")
    texts = frame[text].astype(str).tolist()
    keep, held = carve(len(frame), test_fraction, split_seed)
    keep, held = keep.tolist(), held.tolist()
    if state:
        tok = tokenizers.from_state(state["tokenizer"])
        classes = list(state["classes"])
    else:
        spec = tokenizers.spec_of(str(tokenizer), vocab_size)
        tok = tokenizers.build(spec, [texts[i] for i in keep])
        classes = sorted({str(v) for v in frame[target].iloc[keep]})
    index = {c: i for i, c in enumerate(classes)}
    labels = [str(v) for v in frame[target]]
    unseen = sorted({labels[i] for i in held} - set(index))
    if unseen:
        raise BprunError(
            f"the test rows of {path} hold labels no training row has ({', '.join(unseen[:5])}): "
            "lower dataset.test_fraction or add training rows"
        )
    pad = tok.vocab_size
    ids = np.full((len(texts), block_size), pad, dtype=np.int64)
    for row, t in enumerate(texts):
        encoded = tok.encode_array(t)[:block_size]
        ids[row, : len(encoded)] = encoded
    x, y = torch.from_numpy(ids), torch.tensor([index.get(v, -1) for v in labels])
    return Dataset(
        x_train=x[keep],
        y_train=y[keep],
        x_test=x[held],
        y_test=y[held],
        num_classes=len(classes),
        classes=classes,
        state={"tokenizer": tok.state(), "classes": classes},
        vocab_size=pad + 1,
        pad_id=pad,
    )
