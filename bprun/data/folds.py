"""Cross-validation folds: which examples of a source's training pool validate in fold k.

`task=cv` hands a source `fold={"k", "folds", "seed", "group"}`; the sources that fit
statistics on their training split (table, image folder) take the fold's validation part
from `fold_split` instead of a random `val_fraction`, so every statistic still comes from the
training folds alone. Classification pools are stratified by label; with `group` values, no
group is split across folds (scikit-learn's StratifiedGroupKFold or GroupKFold).
"""

from __future__ import annotations

import numpy as np
import torch

from bprun.errors import BprunError


def fold_split(n: int, fold: dict, labels=None, groups=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held) indices of `n` examples: fold `fold["k"]` of `fold["folds"]` held out.
    `labels` (class labels: stratify) and `groups` (keep each group whole) are optional."""
    from sklearn import model_selection as ms

    k, folds, seed = int(fold["k"]), int(fold["folds"]), int(fold.get("seed", 0))
    if not 0 <= k < folds:
        raise BprunError(f"fold {k} of {folds} does not exist: cv.folds must be at least {k + 1}")
    x = np.zeros((n, 1))
    y = None if labels is None else np.asarray(labels)
    if groups is not None:
        groups = np.asarray(groups)
        count = len(np.unique(groups))
        if count < folds:
            raise BprunError(
                f"cv.group has {count} distinct values, fewer than cv.folds={folds}: lower "
                "cv.folds or group by a finer column"
            )
        if y is not None:
            splitter = ms.StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
        else:
            splitter = ms.GroupKFold(folds)
            order = np.random.default_rng(seed).permutation(n)  # GroupKFold does not shuffle
            x, groups = x[order], groups[order]
        splits = list(splitter.split(x, y, groups))
        kept, held = splits[k]
        if y is None:
            kept, held = order[kept], order[held]
    elif y is not None:
        smallest = int(np.bincount(np.unique(y, return_inverse=True)[1]).min())
        if smallest < folds:
            raise BprunError(
                f"a class has {smallest} example(s) in the training pool, fewer than "
                f"cv.folds={folds}: lower cv.folds so each fold can hold every class"
            )
        kept, held = list(ms.StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y))[k]
    else:
        kept, held = list(ms.KFold(folds, shuffle=True, random_state=seed).split(x))[k]
    return torch.as_tensor(np.sort(kept)), torch.as_tensor(np.sort(held))
