"""Interactions: rows of (user, item[, rating][, time]) from a CSV or Parquet file, or generated.

User and item ids (any text or numbers) become indices 0..U-1 and 0..I-1; the two maps are the
source's `state`, kept in checkpoints, so resume, eval and `task=recommend` read the file the
same way. Each user's interactions are ordered by `time` (file order breaks ties; `split=random`
orders them by a seeded shuffle instead) and split leave-last-out: the last one is the user's
test item, the one before it the validation item, the rest train. Users with fewer than
`min_interactions` rows are dropped, and counted in the log.

What the model sees (see `bprun.models.recsys`): a long tensor per example, the user's index
then candidate items, scored as (B, candidates); a user alone is scored against every item.
- implicit feedback (no `rating`): training rows are [user, positive, `negatives` sampled
  items]; the negatives are drawn afresh each epoch from a generator seeded by (seed, epoch)
  (`NegativeSampler`), so resume is exact, and never one of the user's training items. Each
  validation and test user is one row: [user, held-out item, `eval_negatives` items the user
  never interacted with], seeded by `split_seed`, or [user] alone with `eval_negatives=all`
  (ranked over every item, the user's past items excluded).
- explicit ratings: rows [user, item] with the rating as a float target.
Targets of implicit rows are [user, column of the positive in the scores, an item to exclude
besides the training items (the validation item, for the test split) or -1].
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from bprun.data.sampler import epoch_seed
from bprun.data.sources import Dataset
from bprun.errors import BprunError

log = logging.getLogger("bprun")

NEGATIVE_STREAM = 7919  # keeps the negatives' generator apart from the order's (same seed)


def load_interactions(
    path: str | None = None,
    user: str = "user",
    item: str = "item",
    rating: str | None = None,
    time: str | None = None,
    split: str = "last",
    split_seed: int = 0,
    min_interactions: int = 3,
    negatives: int = 4,
    eval_negatives: int | str = 99,
    state: dict | None = None,
) -> Dataset:
    """The interactions of `path`; see the module docstring."""
    from bprun.data.table import read_table

    frame = read_table(path, "dataset.path")
    frame.columns = [str(c) for c in frame.columns]
    columns = list(frame.columns)
    for key, name in (("user", user), ("item", item), ("rating", rating), ("time", time)):
        if name is not None and name not in columns:
            raise BprunError(
                f"dataset.{key}={name} is not a column of {path}; the columns are "
                f"{', '.join(columns)}: set dataset.{key}=<column>"
            )
    for name in (user, item):
        missing = int(frame[name].isna().sum())
        if missing:
            raise BprunError(
                f"column '{name}' of {path} has {missing} empty id(s): drop those rows"
            )
    ratings = None
    if rating is not None:
        import pandas as pd

        values = pd.to_numeric(frame[rating], errors="coerce")
        bad = frame[rating][values.isna()]
        if len(bad) or not pd.api.types.is_numeric_dtype(values):
            raise BprunError(
                f"rating column '{rating}' of {path} is not numeric ({len(bad)} value(s) are "
                f"not numbers, e.g. {bad.iloc[0]!r} in row {bad.index[0] + 2}): fix the file, "
                "or drop dataset.rating for implicit feedback"
            )
        ratings = values.to_numpy(dtype=np.float64)
    times = _times(frame[time], time, path) if time is not None else None
    return from_columns(
        frame[user].astype(str).to_numpy(),
        frame[item].astype(str).to_numpy(),
        ratings,
        times,
        split=split,
        split_seed=split_seed,
        min_interactions=min_interactions,
        negatives=negatives,
        eval_negatives=eval_negatives,
        state=state,
    )


def _times(column, name: str, path: str) -> np.ndarray:
    import pandas as pd

    if pd.api.types.is_numeric_dtype(column) and not column.isna().any():
        return column.to_numpy(dtype=np.float64)
    parsed = pd.to_datetime(column, errors="coerce")
    if parsed.isna().any():
        row = int(np.flatnonzero(parsed.isna().to_numpy())[0])
        raise BprunError(
            f"time column '{name}' of {path} holds {column.iloc[row]!r} in row {row + 2}, "
            "neither a number nor a date: fix the file, or drop dataset.time to keep file order"
        )
    return parsed.astype("int64").to_numpy().astype(np.float64)


def generate_interactions(
    num_users: int = 3000,
    num_items: int = 2000,
    per_user: int = 20,
    factors: int = 8,
    affinity: float = 2.0,
    popularity: float = 1.0,
    seed: int = 0,
    split: str = "last",
    split_seed: int = 0,
    min_interactions: int = 3,
    negatives: int = 4,
    eval_negatives: int | str = 99,
    state: dict | None = None,
) -> Dataset:
    """Implicit feedback from a latent-factor model with popularity skew (no download).

    User u picks about `per_user` distinct items, with probability proportional to
    exp(affinity * <p_u, q_i> + popularity * log-popularity of i), where p and q are Gaussian
    `factors`-wide vectors scaled so that <p_u, q_i> has variance 1, and the items' popularity
    follows Zipf's law; times are the order of picking. A
    model that learns the factors beats a popularity ranking, which knows the skew alone.
    """
    rng = np.random.default_rng(seed)
    p = rng.normal(size=(num_users, factors)) / factors**0.25
    q = rng.normal(size=(num_items, factors)) / factors**0.25
    zipf = -np.log(np.arange(1, num_items + 1))[rng.permutation(num_items)]
    counts = np.clip(rng.poisson(per_user, num_users), min_interactions, num_items // 2)
    users, items = [], []
    for start in range(0, num_users, 512):  # a block of users at a time: bounded memory
        block = slice(start, min(start + 512, num_users))
        logits = affinity * (p[block] @ q.T) + popularity * zipf
        gumbel = -np.log(-np.log(rng.random(logits.shape)))  # top-n of logits + Gumbel noise:
        picked = np.argsort(-(logits + gumbel), axis=1)  # n draws without replacement
        for row, n in enumerate(counts[block]):
            users.append(np.full(n, start + row))
            items.append(picked[row, :n])
    users, items = np.concatenate(users), np.concatenate(items)
    return from_columns(
        users.astype(str),
        items.astype(str),
        None,
        None,
        split=split,
        split_seed=split_seed,
        min_interactions=min_interactions,
        negatives=negatives,
        eval_negatives=eval_negatives,
        state=state,
    )


def from_columns(
    users: np.ndarray,
    items: np.ndarray,
    ratings: np.ndarray | None,
    times: np.ndarray | None,
    *,
    split: str,
    split_seed: int,
    min_interactions: int,
    negatives: int,
    eval_negatives: int | str,
    state: dict | None,
) -> Dataset:
    """The Dataset of interaction columns (ids as text), in row order."""
    if split not in ("last", "random"):
        raise BprunError(f"dataset.split must be last or random, got {split}")
    if not isinstance(min_interactions, int) or min_interactions < 1:
        raise BprunError(
            f"dataset.min_interactions must be a whole number of at least 1, got {min_interactions}"
        )
    if ratings is None and (not isinstance(negatives, int) or negatives < 1):
        raise BprunError(f"dataset.negatives must be a whole number of at least 1, got {negatives}")
    if eval_negatives != "all" and (not isinstance(eval_negatives, int) or eval_negatives < 1):
        raise BprunError(
            f"problem.eval_negatives must be a whole number of at least 1 or all, got "
            f"{eval_negatives}"
        )
    order = np.arange(len(users), dtype=np.float64) if times is None else times
    # One row per (user, item): the last one (in time) counts, as a recommender sees it now.
    last = np.lexsort((np.arange(len(users)), order))  # by time, file order within ties
    users, items, order = users[last], items[last], order[last]
    ratings = ratings[last] if ratings is not None else None
    user_code = np.unique(users, return_inverse=True)[1].reshape(-1)
    item_ids, item_code = np.unique(items, return_inverse=True)
    pair = user_code.astype(np.int64) * len(item_ids) + item_code.reshape(-1)
    _, keep_rev = np.unique(pair[::-1], return_index=True)
    keep = np.sort(len(pair) - 1 - keep_rev)
    if len(keep) < len(pair):
        log.info(f"interactions: {len(pair) - len(keep)} repeated (user, item) rows; the last kept")
    users, items, order = users[keep], items[keep], order[keep]
    ratings = ratings[keep] if ratings is not None else None

    user_ids, per_user = np.unique(users, return_counts=True)
    few = user_ids[per_user < min_interactions]
    if len(few):
        log.info(
            f"interactions: {len(few)} of {len(user_ids)} users have fewer than "
            f"dataset.min_interactions={min_interactions} interactions and are dropped"
        )
        kept = ~np.isin(users, few)
        users, items, order = users[kept], items[kept], order[kept]
        ratings = ratings[kept] if ratings is not None else None
    if len(users) == 0:
        raise BprunError(
            f"no user has dataset.min_interactions={min_interactions} interactions: lower it"
        )
    if state is None:
        state = {
            "users": sorted(set(users.tolist())),
            "items": sorted(set(items.tolist())),
            "explicit": ratings is not None,
        }
    u, u_known = _index(state["users"], users)
    i, i_known = _index(state["items"], items)
    known = u_known & i_known
    if not known.all():  # the file changed since the run that fitted the maps
        log.warning(
            f"interactions: {int((~known).sum())} rows name users or items the checkpoint's id "
            "maps lack; they are left out"
        )
        u, i, order = u[known], i[known], order[known]
        ratings = ratings[known] if ratings is not None else None
    num_users, num_items = len(state["users"]), len(state["items"])

    # Each user's rows in their order (time, or a seeded shuffle), then the position from the end.
    within = order if split == "last" else np.random.default_rng(split_seed).random(len(u))
    rows = np.lexsort((np.arange(len(u)), within, u))
    u, i = u[rows], i[rows]
    ratings = ratings[rows] if ratings is not None else None
    count = np.bincount(u, minlength=num_users)
    ends = np.cumsum(count)
    from_end = ends[u] - 1 - np.arange(len(u))  # 0: the user's last interaction
    held = {"test": (from_end == 0) & (count[u] >= 2), "val": (from_end == 1) & (count[u] >= 3)}
    train = ~(held["test"] | held["val"])
    log.info(
        f"interactions: {num_users} users, {num_items} items; {int(train.sum())} train, "
        f"{int(held['val'].sum())} val, {int(held['test'].sum())} test (split={split})"
    )
    info = {
        "num_users": num_users,
        "num_items": num_items,
        "explicit": state["explicit"],
        "train_users": torch.from_numpy(u[train]),
        "train_items": torch.from_numpy(i[train]),
        # every interaction kept, for task=recommend (which recommends items not among them)
        "users": torch.from_numpy(u),
        "items": torch.from_numpy(i),
    }
    if state["explicit"]:
        if ratings is None:
            raise BprunError("the checkpoint was trained on ratings: set dataset.rating=<column>")
        parts = {
            name: (
                torch.from_numpy(np.stack([u[m], i[m]], 1)),
                torch.from_numpy(ratings[m].astype(np.float32)).view(-1, 1),
            )
            for name, m in (("train", train), ("val", held["val"]), ("test", held["test"]))
        }
        return _dataset(parts, num_items, state, info, None)

    seen = Seen(u, i, num_users, num_items)  # every interaction: eval candidates avoid them all
    trained = Seen(u[train], i[train], num_users, num_items)
    unseen = num_items - np.bincount(u[train], minlength=num_users)
    if negatives > unseen.min():
        worst = int(np.argmin(unseen))
        raise BprunError(
            f"dataset.negatives={negatives} is more than the {int(unseen.min())} items user "
            f"{state['users'][worst]} has not seen in training: lower dataset.negatives to at "
            f"most {int(unseen.min())}"
        )
    val_item = np.full(num_users, -1, dtype=np.int64)
    val_item[u[held["val"]]] = i[held["val"]]
    g = torch.Generator().manual_seed(split_seed)
    parts = {}
    for name in ("val", "test"):
        m = held[name]
        users_, items_ = torch.from_numpy(u[m]), torch.from_numpy(i[m])
        if eval_negatives == "all":
            x = users_.view(-1, 1)
            extra = (
                torch.from_numpy(val_item[u[m]]) if name == "test" else torch.full_like(users_, -1)
            )
            y = torch.stack([users_, items_, extra], 1)
        else:
            free = num_items - seen.count[u[m]]
            if len(free) and eval_negatives > free.min():
                worst = int(u[m][np.argmin(free)])
                raise BprunError(
                    f"problem.eval_negatives={eval_negatives} is more than the {int(free.min())} "
                    f"items user {state['users'][worst]} never interacted with: lower it, or "
                    "rank over every item with problem.eval_negatives=all"
                )
            cands = seen.sample(users_, eval_negatives, g, distinct=True)
            x = torch.cat([users_.view(-1, 1), items_.view(-1, 1), cands], 1)
            y = torch.stack([users_, torch.zeros_like(users_), torch.full_like(users_, -1)], 1)
        parts[name] = (x, y)
    tu, ti = torch.from_numpy(u[train]), torch.from_numpy(i[train])
    x_train = torch.cat([tu.view(-1, 1), ti.view(-1, 1), torch.zeros(len(tu), negatives).long()], 1)
    y_train = torch.stack([tu, torch.zeros_like(tu), torch.full_like(tu, -1)], 1)
    parts["train"] = (x_train, y_train)
    info["val_item"] = torch.from_numpy(val_item)
    info["eval_negatives"] = eval_negatives
    return _dataset(parts, num_items, state, info, NegativeSampler(trained))


def _dataset(parts: dict, num_items: int, state: dict, info: dict, sampler) -> Dataset:
    return Dataset(
        x_train=parts["train"][0],
        y_train=parts["train"][1],
        x_val=parts["val"][0],
        y_val=parts["val"][1],
        x_test=parts["test"][0],
        y_test=parts["test"][1],
        num_classes=num_items,
        problem="ranking",
        state=state,
        info=info,
        epoch_inputs=sampler,
    )


def _index(ids: list[str], values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of each value in the sorted `ids`, whether it is there), by binary search."""
    table = np.array(ids, dtype=str)
    at = np.searchsorted(table, values).clip(max=max(len(table) - 1, 0))
    return at.astype(np.int64), table[at] == values


class Seen:
    """A set of (user, item) pairs as sorted keys user * I + item: membership by binary search,
    and items drawn uniformly outside it, all batched (no Python loop per user)."""

    def __init__(self, users: np.ndarray, items: np.ndarray, num_users: int, num_items: int):
        self.num_items = num_items
        self.keys = torch.from_numpy(np.unique(users * num_items + items))
        self.count = np.bincount(users, minlength=num_users)

    def contains(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        keys = users * self.num_items + items
        if len(self.keys) == 0:
            return torch.zeros_like(keys, dtype=torch.bool)
        at = torch.searchsorted(self.keys, keys).clamp_(max=len(self.keys) - 1)
        return self.keys[at] == keys

    def sample(
        self, users: torch.Tensor, n: int, g: torch.Generator, distinct: bool = False
    ) -> torch.Tensor:
        """(len(users), n) items none of which the user has, uniformly; redraws until every
        draw is free (and, with `distinct`, differs from the row's others)."""
        rows = users.view(-1, 1).expand(-1, n)
        out = torch.randint(self.num_items, rows.shape, generator=g)
        redo = self.contains(rows, out)
        if distinct:
            redo |= _repeated(out)
        while redo.any():
            out[redo] = torch.randint(self.num_items, (int(redo.sum()),), generator=g)
            redo = self.contains(rows, out)
            if distinct:
                redo |= _repeated(out)
        return out


def _repeated(a: torch.Tensor) -> torch.Tensor:
    """True where a row's value already occurred earlier in the row (a sort per row)."""
    values, where = a.sort(dim=1, stable=True)
    dup = torch.zeros_like(a, dtype=torch.bool)
    dup[:, 1:] = values[:, 1:] == values[:, :-1]
    return torch.zeros_like(dup).scatter_(1, where, dup)


class NegativeSampler:
    """The training inputs of one epoch: columns 2.. of each row [user, positive, ...] hold
    items drawn from a generator seeded by (seed, epoch), never one of the user's training
    items. A pure function of (seed, epoch): resume is exact, and every rank draws the same
    table and reads its own rows of it, so ranks' negatives are disjoint as their rows are."""

    def __init__(self, seen: Seen):
        self.seen = seen

    def __call__(self, x: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(epoch_seed(seed + NEGATIVE_STREAM, epoch))
        negatives = self.seen.sample(x[:, 0].cpu(), x.shape[1] - 2, g)
        out = x.clone()
        out[:, 2:] = negatives.to(x.device)
        return out
