"""Ranking evaluation speed: 10,000 users, each held-out item among 99 sampled negatives.

Times, interleaved over rounds on the same model and rows: bprun's `Trainer.evaluate` with
the ranking problem (batched scoring, metrics as torchmetrics sums); a hand-written batched
PyTorch loop computing the same NDCG@10; and a loop over users, one model call each (what
batched scoring replaces), timed on a tenth of the users and scaled up.

    python -m bprun.bench --ranking [--users 10000] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import statistics
import time

import torch

from bprun.data import InMemoryLoader
from bprun.data.interactions import generate_interactions
from bprun.engine.settings import TrainerSettings
from bprun.engine.trainer import Trainer
from bprun.models.recsys import MF, NCF
from bprun.problems.ranking import Ranking, target_rank


def hand_written(model, x: torch.Tensor, batch: int) -> float:
    total = 0.0
    with torch.no_grad():
        for lo in range(0, len(x), batch):
            scores = model(x[lo : lo + batch])
            rank = (scores[:, 1:] >= scores[:, :1]).sum(1)
            total += torch.where(rank < 10, 1 / torch.log2(rank + 2.0), 0.0).sum().item()
    return total / len(x)


def per_user(model, x: torch.Tensor) -> float:
    total = 0.0
    with torch.no_grad():
        for row in x:
            scores = model(row.view(1, -1))[0]
            rank = int(target_rank(scores.view(1, -1), torch.zeros(1, dtype=torch.long)))
            total += 1 / torch.log2(torch.tensor(rank + 2.0)).item() if rank < 10 else 0.0
    return total / len(x)


def main(args) -> None:
    torch.set_num_threads(args.threads)
    ds = generate_interactions(num_users=args.users, num_items=2000, per_user=10)
    x, y = ds.x_test, ds.y_test
    problem = Ranking(num_classes=ds.num_classes, metrics=["ndcg@10"], info=ds.info)
    settings = TrainerSettings(device="cpu", progress=False)
    settings.checkpoint.enabled = False
    print(f"{len(x)} users x {x.shape[1] - 2} negatives, {args.threads} thread(s)")
    for model in (
        MF(num_classes=ds.num_classes, num_users=len(ds.state["users"])),
        NCF(num_classes=ds.num_classes, num_users=len(ds.state["users"])),
    ):
        model.eval()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        trainer = Trainer(
            settings, model, problem.criterion(problem.default_loss()), opt, problem=problem
        )
        loader = InMemoryLoader(x, y, 1024)
        times = {"bprun evaluate": [], "hand-written batched": [], "per-user loop (x10)": []}
        for _ in range(args.rounds):
            t = time.perf_counter()
            ours = trainer.evaluate(loader, "test")["test/ndcg@10"]
            times["bprun evaluate"].append(time.perf_counter() - t)
            t = time.perf_counter()
            ref = hand_written(model, x, 1024)
            times["hand-written batched"].append(time.perf_counter() - t)
            t = time.perf_counter()
            per_user(model, x[: len(x) // 10])
            times["per-user loop (x10)"].append(10 * (time.perf_counter() - t))
        assert abs(ours - ref) < 1e-6, (ours, ref)
        base = statistics.median(times["hand-written batched"])
        print(f"{type(model).__name__}: ndcg@10 {ours:.4f}")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"  {name:<22} {med:7.3f} s  ({med / base:.2f}x hand-written)")
