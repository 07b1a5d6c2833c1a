"""Ranking: recommend items to users from their interactions (`dataset=interactions`).

Implicit feedback: each validation and test user holds out one item, which the model ranks
among `eval_negatives` sampled items the user never interacted with (the common protocol,
seeded), or among every item (`eval_negatives=all`), the user's past items excluded. Metrics,
from the held-out item's 0-based rank r (ties count against it: a model that scores every item
alike ranks last, not first):
- hr@k: the share of users whose item is in the top k (r < k); with one held-out item per
  user it is also recall@k;
- ndcg@k: 1 / log2(r + 2) when r < k, else 0 (one relevant item: its ideal DCG is 1);
- mrr: 1 / (r + 1).
Each is a torchmetrics `Metric` of two sum states, so ranks' shares add up under DDP.
The loss (loss=auto) is binary cross-entropy over each row's candidates, the held-out or
positive item labelled 1 (neural collaborative filtering's pointwise loss); loss=cross_entropy
gives a softmax over them, loss=bpr the pairwise BPR loss.

Explicit ratings (`dataset.rating`): the model predicts each rating; rmse and mae, loss mse.

The test split's report ranks the same rows by popularity (the items' training counts), the
baseline a model must beat, and prints it beside the model's figures (`test_baseline.json`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from bprun.errors import BprunError
from bprun.problems import KINDS
from bprun.problems._torchmetrics import load
from bprun.problems.base import Evaluation, Problem

Metric = load().Metric

log = logging.getLogger("bprun")


class RankMetric(Metric):
    """The mean over rows of one function of the target's 0-based rank: hr@k, ndcg@k or mrr."""

    full_state_update = False

    def __init__(self, name: str, k: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.name, self.k = name, k
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, rank: torch.Tensor) -> None:
        rank = rank.double()
        if self.name == "hr":
            gain = (rank < self.k).double()
        elif self.name == "ndcg":
            gain = torch.where(rank < self.k, 1.0 / torch.log2(rank + 2.0), 0.0)
        else:  # mrr
            gain = 1.0 / (rank + 1.0)
        self.total += gain.sum()
        self.count += rank.numel()

    def compute(self) -> torch.Tensor:
        return self.total / self.count.clamp(min=1.0)


def target_rank(scores: torch.Tensor, column: torch.Tensor, exclude=None) -> torch.Tensor:
    """0-based rank of `scores[b, column[b]]` in its row: the other entries scoring at least as
    high, leaving out the (rows, columns) of `exclude`."""
    scores = scores.float()
    target = scores.gather(1, column.view(-1, 1))
    ahead = scores >= target
    ahead.scatter_(1, column.view(-1, 1), False)
    if exclude is not None:
        rows, cols = exclude
        ahead[rows, cols] = False
    return ahead.sum(1)


class CandidateLoss(nn.Module):
    """The loop's criterion for implicit feedback: `loss(scores, column of the positive)`, which
    class-label losses take as they are (bce_with_logits one-hot encodes it)."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(out, y[:, 1])


class Ranking(Problem):
    kind = "ranking"
    names = KINDS["ranking"][1]
    monitor = "val/ndcg@10"
    mode = "max"

    def __init__(
        self,
        num_classes: int = 0,
        metrics=None,
        classes=None,
        k: int = 10,
        eval_negatives: int | str = 99,
        info: dict | None = None,
    ):
        if not isinstance(k, int) or k < 1:
            raise BprunError(f"problem.k must be a whole number of at least 1, got {k}")
        self.k, self.eval_negatives = k, eval_negatives
        self.info = info or {}
        self.explicit = bool(self.info.get("explicit", False))
        self.loss_kind = "regression" if self.explicit else "classification"
        self._on: dict = {}  # device -> the training items as (indptr, items), for exclusion
        super().__init__(num_classes, metrics, classes)

    @classmethod
    def from_data(cls, dataset, **settings) -> Ranking:
        problem = cls(num_classes=dataset.num_classes, info=dataset.info, **settings)
        problem.test_split = (dataset.x_test, dataset.y_test)
        return problem

    def describe_kind(self) -> str:
        return "ranking (explicit ratings)" if self.explicit else "ranking"

    def check_data(self, dataset) -> None:
        if not dataset.info or "num_users" not in dataset.info:
            raise BprunError(
                "problem=ranking needs interactions (users and items): use dataset=interactions "
                "dataset.path=<file> dataset.user=<column> dataset.item=<column>"
            )
        given = dataset.info.get("eval_negatives", self.eval_negatives)
        if not self.explicit and given != self.eval_negatives:
            raise BprunError(
                f"the data was built for problem.eval_negatives={given}, not "
                f"{self.eval_negatives}: give the setting once, as problem.eval_negatives"
            )

    requires_model_arguments = True  # a recommender embeds users: the model must take them

    def model_arguments(self) -> dict:
        return {"num_users": int(self.info.get("num_users", 0))}

    def models_hint(self) -> str:
        return "model=mf or model=ncf"

    # ------------------------------------------------------------------ loss
    def default_loss(self) -> nn.Module:
        from bprun.losses import BCEWithLogitsLoss, MSELoss

        return MSELoss() if self.explicit else BCEWithLogitsLoss()

    def check_loss(self, loss: nn.Module) -> None:
        try:
            super().check_loss(loss)
        except BprunError:
            if self.explicit:
                raise
            raise BprunError(
                f"the loss {type(loss).__name__} is for regression, but implicit feedback ranks "
                "each positive among its candidates: use loss=auto (bce_with_logits), bpr or "
                "cross_entropy (or give dataset.rating to predict ratings)"
            ) from None

    def criterion(self, loss: nn.Module) -> nn.Module:
        return loss if self.explicit else CandidateLoss(loss)

    # ------------------------------------------------------------------ metrics
    def available_metrics(self) -> list[str]:
        if self.explicit:
            return ["rmse", "mae"]
        return [f"hr@{self.k}", f"ndcg@{self.k}", "mrr"]

    def metrics(self) -> dict[str, tuple]:
        tm = load()

        m: dict[str, tuple] = {}
        for name in self.selected:
            if name == "rmse":
                m[name] = (tm.MeanSquaredError(squared=False), "flat")
            elif name == "mae":
                m[name] = (tm.MeanAbsoluteError(), "flat")
            else:
                m[name] = (RankMetric(name.split("@")[0], self.k), "rank")
        return m

    def inputs(self, out: torch.Tensor, y: torch.Tensor) -> dict[str, tuple]:
        if self.explicit:
            return {"flat": (out.float().reshape(-1), y.float().reshape(-1))}
        return {"rank": (self.rank(out, y),)}

    def rank(self, scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The held-out item's rank in each row of `scores`: among its sampled candidates, or
        (scores over every item) among the items the user has not interacted with before."""
        if scores.shape[1] != self.num_classes or self.eval_negatives != "all":
            return target_rank(scores, y[:, 1])
        return target_rank(scores, y[:, 1], self.past_items(y[:, 0], y[:, 2]))

    def past_items(self, users: torch.Tensor, extra: torch.Tensor):
        """(rows, items) of each row's user's training items, and of `extra` (the validation
        item, for a test row) where it is not -1: gathered for the whole batch at once."""
        device = users.device
        if device not in self._on:
            tu, ti = self.info["train_users"], self.info["train_items"]
            order = torch.argsort(tu * self.num_classes + ti)
            counts = torch.bincount(tu, minlength=self.info["num_users"])
            indptr = torch.zeros(len(counts) + 1, dtype=torch.long)
            indptr[1:] = counts.cumsum(0)
            self._on[device] = (indptr.to(device), ti[order].to(device))
        indptr, items = self._on[device]
        start, length = indptr[users], indptr[users + 1] - indptr[users]
        rows = torch.repeat_interleave(torch.arange(len(users), device=device), length)
        offsets = torch.arange(len(rows), device=device) - torch.repeat_interleave(
            length.cumsum(0) - length, length
        )
        cols = items[torch.repeat_interleave(start, length) + offsets]
        has = extra >= 0
        rows = torch.cat([rows, torch.arange(len(users), device=device)[has]])
        return rows, torch.cat([cols, extra[has]])

    def popularity(self) -> torch.Tensor:
        """Each item's count of training interactions: the baseline's scores."""
        return torch.bincount(self.info["train_items"], minlength=self.num_classes).float()

    # ------------------------------------------------------------------ what a run says
    def report(self, evaluation: Evaluation, folder: Path, prefix: str, tracker=None) -> None:
        """The popularity baseline on the test split, beside the model's figures."""
        if self.explicit or prefix != "test" or not hasattr(self, "test_split"):
            return
        from bprun.io import write_json

        baseline = self.baseline(*self.test_split)
        if not baseline:
            return
        model = {k: float(v) for k, v in evaluation.values.items() if k in baseline}
        write_json({"popularity": baseline, "model": model}, Path(folder) / "test_baseline.json")
        line = ", ".join(
            f"{k} {model.get(k, math.nan):.4f} (popularity {v:.4f})" for k, v in baseline.items()
        )
        log.info(f"test: {line}")
        if tracker is not None:
            tracker.log({f"test_popularity/{k}": v for k, v in baseline.items()}, 0)

    def baseline(self, x: torch.Tensor, y: torch.Tensor, batch: int = 4096) -> dict[str, float]:
        """The selected metrics of ranking `x`'s rows by popularity."""
        pop = self.popularity()
        # one process ranks the whole split (rank 0 reports): nothing to gather from others
        metrics = {
            n: RankMetric(n.split("@")[0], self.k, sync_on_compute=False) for n in self.selected
        }
        for lo in range(0, len(x), batch):
            xb, yb = x[lo : lo + batch].cpu(), y[lo : lo + batch].cpu()
            scores = pop[xb[:, 1:]] if xb.shape[1] > 1 else pop.expand(len(xb), -1)
            rank = self.rank(scores, yb)
            for metric in metrics.values():
                metric.update(rank)
        if not len(x):
            return {}
        return {n: float(m.compute()) for n, m in metrics.items()}
