"""`task=recommend ckpt=<run> recommend.users=[...] recommend.k=10`: the top-k items each user
has not interacted with, by a trained recommender's scores, as a CSV in the run folder.

The run's own data (read with the checkpoint's id maps) says which items each user has seen;
every item is scored for each user in batches. A user id the run never saw is an error unless
`recommend.cold_start=popular`, which gives such users the items with most training
interactions.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from bprun.engine import checkpoint as ckpt_io
from bprun.engine.averaging import use_averaged_weights
from bprun.errors import BprunError
from bprun.io import atomic_write
from bprun.tasks.eval import saved_run, saved_settings
from bprun.tasks.setup import build_trainer, data_state

log = logging.getLogger("bprun")

BATCH = 1024  # users scored at once


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] = ()) -> float | None:
    if not cfg.get("ckpt"):
        raise BprunError("task=recommend needs ckpt=<run folder or .pt file of a recommender>")
    rec = OmegaConf.to_container(cfg.recommend, resolve=True)
    k, cold = rec.get("k"), rec.get("cold_start")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise BprunError(f"recommend.k must be a whole number of at least 1, got {k}")
    if cold not in (None, "popular"):
        raise BprunError(f"recommend.cold_start must be null or popular, got {cold}")
    wanted = rec.get("users") or []
    if not isinstance(wanted, list):
        raise BprunError(f"recommend.users takes a list, got {wanted!r}: write [{wanted}]")

    path, state, saved = saved_run(cfg.ckpt)
    maps = data_state(state) or {}
    if "users" not in maps or "items" not in maps:
        raise BprunError(
            f"{path} was not trained on interactions (dataset={saved.dataset.get('_target_')}): "
            "task=recommend needs a run of dataset=interactions with model=mf or ncf"
        )
    index = {u: i for i, u in enumerate(maps["users"])}
    wanted = [_id(u) for u in wanted] or list(maps["users"])
    unknown = [u for u in wanted if u not in index]
    if unknown and cold != "popular":
        shown = ", ".join(unknown[:5]) + (
            f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        )
        raise BprunError(
            f"recommend.users names user(s) the run never saw: {shown} (it knows "
            f"{len(index)} users): give users of its data, or set recommend.cold_start=popular "
            "to recommend them the most popular items"
        )

    trainer, data = build_trainer(
        saved, None, saved_settings(saved, cfg.trainer.device), data_state=maps
    )
    ckpt_io.load_model_state(trainer.module, state["model"], path)
    use_averaged_weights(trainer.module, state, data.train)
    problem, info = trainer.problem, data.dataset.info
    model, device = trainer.module.eval(), trainer.device
    num_items = len(maps["items"])
    seen = _seen(info["users"], info["items"], len(maps["users"]), num_items)

    rows = []
    known = [u for u in wanted if u in index]
    for lo in range(0, len(known), BATCH):
        ids = known[lo : lo + BATCH]
        users = torch.tensor([index[u] for u in ids], device=device)
        with torch.no_grad(), trainer.precision.autocast():
            scores = model(users.view(-1, 1)).float()
        scores[seen.rows(users)] = -torch.inf  # what the user already has
        top, items = scores.topk(min(k, num_items), dim=1)
        for user, row_scores, row_items in zip(ids, top.tolist(), items.tolist(), strict=True):
            ranked = [(s, i) for s, i in zip(row_scores, row_items, strict=True) if s != -torch.inf]
            rows += [(user, r + 1, maps["items"][i], s, "model") for r, (s, i) in enumerate(ranked)]
    if unknown:
        pop, items = problem.popularity().topk(min(k, num_items))
        for user in unknown:
            rows += [
                (user, r + 1, maps["items"][i], float(s), "popular")
                for r, (s, i) in enumerate(zip(pop.tolist(), items.tolist(), strict=True))
            ]
        log.info(f"{len(unknown)} user(s) the run never saw get the {k} most popular items")

    out = Path(rec.get("out") or run_dir / "recommendations.csv")
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["user", "rank", "item", "score", "by"])
    writer.writerows((u, r, i, f"{s:.6g}", by) for u, r, i, s, by in rows)
    atomic_write(out, lambda f: f.write(text.getvalue().encode()))
    log.info(f"wrote the top {k} items for {len(wanted)} user(s) to {out}")
    return None


def _id(value) -> str:
    """A user id as the data's map holds it (text): 7 from the command line is '7'."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


class _seen:
    """Each user's items (every interaction the run's data holds), as a boolean row per user,
    gathered for a batch of users."""

    def __init__(self, users: torch.Tensor, items: torch.Tensor, num_users: int, num_items: int):
        self.users, self.items, self.num_items = users, items, num_items
        order = torch.argsort(users, stable=True)
        self.sorted_users, self.sorted_items = users[order], items[order]

    def rows(self, batch: torch.Tensor) -> torch.Tensor:
        cpu = batch.cpu()
        lo = torch.searchsorted(self.sorted_users, cpu)
        hi = torch.searchsorted(self.sorted_users, cpu, right=True)
        mask = torch.zeros(len(cpu), self.num_items, dtype=torch.bool)
        length = hi - lo
        rows = torch.repeat_interleave(torch.arange(len(cpu)), length)
        offsets = torch.arange(len(rows)) - torch.repeat_interleave(
            length.cumsum(0) - length, length
        )
        mask[rows, self.sorted_items[torch.repeat_interleave(lo, length) + offsets]] = True
        return mask.to(batch.device)
