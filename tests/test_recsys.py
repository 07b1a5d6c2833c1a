"""Recommendation from interactions: id maps and splits, negatives, ranking metrics against
NumPy, the models and sparse Adam, and the real command (train, recommend, resume, bad input)."""

from __future__ import annotations

import csv
import json
import logging
import math
import signal

import numpy as np
import pandas as pd
import pytest
import torch
from test_checkpoint import model_state, resumed_at, saved_update, start, wait_for_update

from bprun.data.interactions import generate_interactions, load_interactions
from bprun.errors import BprunError
from bprun.models.recsys import MF, NCF
from bprun.optim import SparseAdam
from bprun.problems.ranking import Ranking, RankMetric


def write_interactions(path, users=40, items=30, seed=0, rating=False):
    """Users with 2..9 interactions each, rows shuffled, a time column giving their order."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        picked = rng.choice(items, size=int(rng.integers(2, 10)), replace=False)
        for t, i in enumerate(picked):
            rows.append({"uid": f"u{u}", "iid": f"item{i}", "ts": 100 * u + t, "stars": t % 5 + 1})
    frame = pd.DataFrame(rows).sample(frac=1.0, random_state=seed)  # file order is not time order
    if not rating:
        frame = frame.drop(columns="stars")
    frame.to_csv(path, index=False)
    return frame


def load(path, **kw):
    kw = {"user": "uid", "item": "iid", "time": "ts", "eval_negatives": 5, **kw}
    return load_interactions(str(path), **kw)


# ---------------------------------------------------------------------- data
def test_id_maps_and_leave_last_out_split(tmp_path, caplog):
    frame = write_interactions(tmp_path / "x.csv")
    with caplog.at_level(logging.INFO, logger="bprun"):
        ds = load(tmp_path / "x.csv")
    counts = frame.groupby("uid").size()
    few = int((counts < 3).sum())
    assert (
        few > 0 and f"{few} of 40 users have fewer than dataset.min_interactions=3" in caplog.text
    )
    users, items = ds.state["users"], ds.state["items"]
    assert users == sorted(counts[counts >= 3].index)
    assert items == sorted(frame[frame.uid.isin(users)].iid.unique())
    by_time = frame.sort_values("ts").groupby("uid").iid.apply(list)
    for split, x, back in (("test", ds.x_test, 1), ("val", ds.x_val, 2)):
        assert len(x) == len(users)
        for row in x:
            user = users[int(row[0])]
            assert items[int(row[1])] == by_time[user][-back], (split, user)
    train = {(users[u], items[i]) for u, i in ds.x_train[:, :2].tolist()}
    expected = {(u, i) for u in users for i in by_time[u][:-2]}
    assert train == expected
    # the maps travel in the checkpoint: read back with them, the same indices come out
    again = load(tmp_path / "x.csv", state=ds.state)
    assert torch.equal(again.x_test, ds.x_test) and torch.equal(again.x_train, ds.x_train)


def test_random_split_is_seeded_and_holds_out_one_item_per_user(tmp_path):
    write_interactions(tmp_path / "x.csv")
    a = load(tmp_path / "x.csv", split="random", split_seed=1)
    b = load(tmp_path / "x.csv", split="random", split_seed=1)
    c = load(tmp_path / "x.csv", split="random", split_seed=2)
    assert torch.equal(a.x_test, b.x_test) and not torch.equal(a.x_test[:, 1], c.x_test[:, 1])
    for ds in (a, c):
        held = set(map(tuple, ds.x_test[:, :2].tolist())) | set(
            map(tuple, ds.x_val[:, :2].tolist())
        )
        train = set(map(tuple, ds.x_train[:, :2].tolist()))
        assert not held & train and len(held) == 2 * len(ds.x_test)


def test_negatives_are_seeded_and_never_a_users_training_item(tmp_path):
    write_interactions(tmp_path / "x.csv", items=15)
    ds = load(tmp_path / "x.csv", negatives=6)
    train = set(map(tuple, ds.x_train[:, :2].tolist()))
    e0, again, e1 = (ds.epoch_inputs(ds.x_train, 3, e) for e in (0, 0, 1))
    assert torch.equal(e0, again) and not torch.equal(e0, e1)
    assert torch.equal(e0[:, :2], ds.x_train[:, :2])
    for x in (e0, e1):
        for row in x.tolist():
            assert all((row[0], n) not in train for n in row[2:])
    # evaluation candidates: items the user never interacted with at all, distinct in a row
    every = (
        train
        | set(map(tuple, ds.x_val[:, :2].tolist()))
        | set(map(tuple, ds.x_test[:, :2].tolist()))
    )
    for row in ds.x_test.tolist():
        assert len(set(row[2:])) == 5 and all((row[0], n) not in every for n in row[2:])


# ---------------------------------------------------------------------- metrics
def numpy_metrics(scores, target_col, k, excluded=()):
    """HR@k, NDCG@k, MRR from a direct loop: the rank counts the other non-excluded items
    scoring at least as high as the target."""
    hr = ndcg = mrr = 0.0
    for b, row in enumerate(scores):
        t = target_col[b]
        skip = {c for r, c in excluded if r == b}
        rank = sum(1 for c, s in enumerate(row) if c != t and c not in skip and s >= row[t])
        hr += rank < k
        ndcg += 1 / math.log2(rank + 2) if rank < k else 0.0
        mrr += 1 / (rank + 1)
    n = len(scores)
    return {f"hr@{k}": hr / n, f"ndcg@{k}": ndcg / n, "mrr": mrr / n}


def evaluate(problem, scores, y):
    evaluation = problem.evaluation("cpu")
    for lo in range(0, len(scores), 7):  # several batches: the sums accumulate
        evaluation.update(torch.tensor(0.0), scores[lo : lo + 7], y[lo : lo + 7])
    return {
        k.split("/", 1)[1]: v for k, v in evaluation.compute("test").items() if k != "test/loss"
    }


def test_hand_made_case_matches_numpy():
    # 3 users, the held-out item in column 0 of 4 candidates; ranks 0, 2 and 3 (tie counted)
    scores = torch.tensor([[0.9, 0.1, 0.2, 0.3], [0.5, 0.7, 0.6, 0.1], [0.4, 0.4, 0.9, 0.8]])
    y = torch.tensor([[0, 0, -1]] * 3)
    got = evaluate(Ranking(num_classes=50, k=2, info={"num_users": 3}), scores, y)
    assert got == pytest.approx({"hr@2": 1 / 3, "ndcg@2": 1 / 3, "mrr": (1 + 1 / 3 + 1 / 4) / 3})
    assert got == pytest.approx(numpy_metrics(scores.numpy(), [0, 0, 0], 2))


@pytest.mark.parametrize("k", [1, 5, 10])
def test_sampled_candidates_match_numpy(k):
    g = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 8, (40, 12), generator=g).float()  # many ties
    y = torch.stack([torch.arange(40), torch.zeros(40, dtype=torch.long), torch.full((40,), -1)], 1)
    got = evaluate(Ranking(num_classes=100, k=k, info={"num_users": 40}), scores, y)
    assert got == pytest.approx(numpy_metrics(scores.numpy(), [0] * 40, k))


def test_all_items_exclude_the_users_past_items_like_numpy():
    g = torch.Generator().manual_seed(0)
    users, items = 6, 20
    train_u = torch.tensor([0, 0, 1, 2, 2, 2, 4, 5])
    train_i = torch.tensor([3, 7, 0, 1, 2, 19, 5, 5])
    info = {"num_users": users, "num_items": items, "train_users": train_u, "train_items": train_i}
    problem = Ranking(num_classes=items, k=5, eval_negatives="all", info=info)
    scores = torch.rand(users, items, generator=g)
    target = torch.tensor([4, 8, 9, 10, 11, 12])
    val_item = torch.tensor([5, -1, 6, -1, -1, 13])  # a test row also leaves out the val item
    y = torch.stack([torch.arange(users), target, val_item], 1)
    excluded = [(u, i) for u, i in zip(train_u.tolist(), train_i.tolist(), strict=True)]
    excluded += [(u, i) for u, i in enumerate(val_item.tolist()) if i >= 0]
    got = evaluate(problem, scores, y)
    assert got == pytest.approx(numpy_metrics(scores.numpy(), target.tolist(), 5, excluded))
    assert got != pytest.approx(numpy_metrics(scores.numpy(), target.tolist(), 5))  # it matters


def test_rank_metrics_sync_as_sums():
    """Under DDP torchmetrics reduces each state with its dist_reduce_fx: sums of gains and
    counts add up over ranks to the whole split's mean."""
    from torchmetrics.utilities.data import dim_zero_sum

    m = RankMetric("ndcg", 10)
    assert set(m._reductions) == {"total", "count"}
    assert all(fx is dim_zero_sum for fx in m._reductions.values())


def test_popularity_baseline_ranks_by_training_counts():
    info = {
        "num_users": 3,
        "train_users": torch.tensor([0, 1, 2, 2]),
        "train_items": torch.tensor([2, 2, 2, 1]),
    }
    problem = Ranking(num_classes=4, k=1, info=info)
    x = torch.tensor([[0, 2, 0, 3], [1, 1, 2, 0], [2, 0, 3, 1]])  # user, held-out, candidates
    y = torch.tensor([[0, 0, -1], [1, 0, -1], [2, 0, -1]])
    # counts 0, 1, 3, 0: ranks 0, 1 and 2 (item 0 ties item 3 at 0, and a tie counts against)
    expected = {"hr@1": 1 / 3, "ndcg@1": 1 / 3, "mrr": (1 + 1 / 2 + 1 / 3) / 3}
    assert problem.baseline(x, y) == pytest.approx(expected)


# ---------------------------------------------------------------------- models, optimizer
@pytest.mark.parametrize("cls", [MF, NCF])
def test_models_score_candidates_and_all_items_alike(cls):
    torch.manual_seed(0)
    model = cls(num_classes=9, num_users=4, init_std=0.5)
    users = torch.tensor([0, 3, 1])
    every = model(users.view(-1, 1))
    assert every.shape == (3, 9)
    items = torch.tensor([[8, 0, 4], [1, 2, 3], [5, 5, 6]])
    picked = model(torch.cat([users.view(-1, 1), items], 1))
    assert torch.allclose(picked, every.gather(1, items), atol=1e-6)


def test_sparse_adam_matches_torch_on_sparse_and_dense_parameters():
    torch.manual_seed(0)
    weights = torch.randn(6, 3)
    dense = torch.randn(3)
    ours_e, ours_d = torch.nn.Embedding(6, 3, sparse=True), torch.nn.Parameter(dense.clone())
    ref_e, ref_d = torch.nn.Embedding(6, 3, sparse=True), torch.nn.Parameter(dense.clone())
    ours_e.weight.data.copy_(weights)
    ref_e.weight.data.copy_(weights)
    ours = SparseAdam([ours_e.weight, ours_d], lr=0.1)
    ref_sparse, ref_dense = (
        torch.optim.SparseAdam([ref_e.weight], lr=0.1),
        torch.optim.Adam([ref_d], lr=0.1),
    )
    for step in range(4):
        rows = torch.tensor([[0, 2], [2, 5], [1, 1], [0, 4]][step])
        for emb, p, opts in ((ours_e, ours_d, [ours]), (ref_e, ref_d, [ref_sparse, ref_dense])):
            (emb(rows).pow(2).sum() + (p * rows.sum()).sin().sum()).backward()
            for o in opts:
                o.step()
                o.zero_grad()
    assert torch.allclose(ours_e.weight, ref_e.weight, atol=1e-6)
    assert torch.allclose(ours_d, ref_d, atol=1e-6)
    assert torch.equal(ours_e.weight[3], weights[3])  # a row never looked up stays


def test_generated_demo_has_popularity_skew_and_every_user_held_out():
    ds = generate_interactions(num_users=200, num_items=150, per_user=10, eval_negatives=20)
    counts = torch.bincount(ds.x_train[:, 1], minlength=150).sort(descending=True).values
    assert counts[:15].sum() > 2 * counts[-75:].sum()  # the top tenth outweighs the bottom half
    assert len(ds.x_test) == len(ds.x_val) == 200


# ---------------------------------------------------------------------- the command
TRAIN = [
    "dataset=interactions",
    "dataset.user=uid",
    "dataset.item=iid",
    "dataset.time=ts",
    "dataset.batch_size=32",
    "problem.eval_negatives=10",
    "trainer.monitor=val/ndcg@10",
    "trainer.mode=max",
]


@pytest.mark.slow
def test_train_ncf_with_sparse_adam_then_recommend(bprun, tmp_path):
    write_interactions(tmp_path / "x.csv", users=60)
    r = bprun(
        *TRAIN,
        f"dataset.path={tmp_path / 'x.csv'}",
        "model=ncf",
        "optim=sparse_adam",
        "trainer.max_epochs=2",
    )
    assert "embeddings give sparse gradients" in r.output
    test = r.metrics["test"]
    assert {"test/hr@10", "test/ndcg@10", "test/mrr"} <= test.keys()
    assert 0 < test["test/ndcg@10"] <= test["test/hr@10"] <= 1
    baseline = json.loads((r.run_dir / "test_baseline.json").read_text())
    assert set(baseline["popularity"]) == {"hr@10", "ndcg@10", "mrr"}
    assert "(popularity " in r.output
    state = torch.load(r.run_dir / "checkpoints" / "last.pt", weights_only=True)
    users = state["extra"]["data"]["users"]
    assert users[0] == "u0" and "item0" in state["extra"]["data"]["items"]

    bad = bprun("task=recommend", f"ckpt={r.run_dir}", "recommend.users=[u0,nobody]", check=False)
    assert bad.returncode != 0 and "never saw: nobody" in bad.output
    assert "recommend.cold_start=popular" in bad.output and "Traceback" not in bad.output
    assert not (r.run_dir / "recommendations.csv").exists()

    bprun(
        "task=recommend",
        f"ckpt={r.run_dir}",
        f"recommend.users=[{users[0]},nobody,{users[1]}]",
        "recommend.cold_start=popular",
        "recommend.k=4",
    )
    with open(r.run_dir / "recommendations.csv") as f:
        rows = list(csv.DictReader(f))
    by_model = [(users[0], "model")] * 4 + [(users[1], "model")] * 4
    assert [(row["user"], row["by"]) for row in rows] == by_model + [("nobody", "popular")] * 4
    frame = pd.read_csv(tmp_path / "x.csv")
    for row in rows[:8]:  # never an item the user already has
        assert row["item"] not in set(frame[frame.uid == row["user"]].iid)
    for user_rows in (rows[:4], rows[4:8], rows[8:]):
        scores = [float(row["score"]) for row in user_rows]
        assert scores == sorted(scores, reverse=True) and [int(r["rank"]) for r in user_rows] == [
            1,
            2,
            3,
            4,
        ]
    ds = load(tmp_path / "x.csv")  # the unseen user gets the items most trained on
    counts = torch.bincount(ds.info["train_items"], minlength=ds.num_classes)
    fourth = counts.sort(descending=True).values[3]
    assert all(counts[ds.state["items"].index(row["item"])] >= fourth for row in rows[8:])
    assert [float(row["score"]) for row in rows[8:]] == sorted(counts.tolist(), reverse=True)[:4]


@pytest.mark.slow
def test_explicit_ratings_train_with_rmse(bprun, tmp_path):
    write_interactions(tmp_path / "x.csv", rating=True)
    r = bprun(
        "dataset=interactions",
        f"dataset.path={tmp_path / 'x.csv'}",
        "dataset.user=uid",
        "dataset.item=iid",
        "dataset.rating=stars",
        "model=mf",
        "optim.lr=0.05",
        "trainer.max_epochs=3",
    )
    assert {"test/rmse", "test/mae"} <= r.metrics["test"].keys()
    assert r.metrics["history"][-1]["val/loss"] < r.metrics["history"][0]["val/loss"]


def test_bad_input_is_one_error_line_and_leaves_no_run_folder(bprun, tmp_path):
    write_interactions(tmp_path / "x.csv")
    r = bprun(
        *TRAIN,
        f"dataset.path={tmp_path / 'x.csv'}",
        "model=mf",
        "dataset.user=customer",
        check=False,
    )
    assert r.returncode == 1, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "dataset.user=customer is not a column of" in errors[0], r.output
    assert "Traceback" not in r.output and not r.run_dir.exists()


def test_data_errors_name_the_fix(tmp_path):
    frame = write_interactions(tmp_path / "x.csv")
    frame["note"] = ["good" if n % 3 else "4" for n in range(len(frame))]
    frame.to_csv(tmp_path / "x.csv", index=False)
    with pytest.raises(BprunError, match="rating column 'note' .* is not numeric .*'good'"):
        load(tmp_path / "x.csv", rating="note")
    with pytest.raises(BprunError, match=r"dataset.negatives=29 is more than the 2\d? items"):
        load(tmp_path / "x.csv", negatives=29)
    with pytest.raises(BprunError, match="eval_negatives=all"):
        load(tmp_path / "x.csv", eval_negatives=28)
    with pytest.raises(BprunError, match="dataset.item=sku is not a column"):
        load(tmp_path / "x.csv", item="sku")


def test_models_and_losses_that_do_not_fit_name_those_that_do(tmp_path):
    from omegaconf import OmegaConf

    from bprun.build import build_loss, build_model, build_problem
    from bprun.losses import MSELoss

    write_interactions(tmp_path / "x.csv")
    ds = load(tmp_path / "x.csv")
    problem = build_problem(OmegaConf.create({"kind": "auto", "eval_negatives": 5}), ds)
    assert problem.kind == "ranking" and problem.model_arguments() == {
        "num_users": len(ds.state["users"])
    }
    with pytest.raises(BprunError, match="use model=mf or model=ncf"):
        build_model(OmegaConf.create({"_target_": "bprun.models.MLP", "hidden": [8]}), ds, problem)
    with pytest.raises(BprunError, match="use loss=auto .bce_with_logits., bpr or cross_entropy"):
        problem.check_loss(MSELoss())
    model = build_model(OmegaConf.create({"_target_": "bprun.models.recsys.MF"}), ds, problem)
    loss = build_loss(OmegaConf.create({"_target_": "bprun.losses.BPRLoss"}), problem)
    x, y = ds.epoch_inputs(ds.x_train, 0, 0), ds.y_train
    with torch.no_grad():  # MF starts near 0: every pair at log 2
        value = float(problem.criterion(loss)(model(x), y))
    assert value == pytest.approx(math.log(2), abs=1e-3)


@pytest.mark.slow
def test_sigkill_then_resume_is_exact(bprun, data_dir, tmp_path):
    write_interactions(tmp_path / "x.csv", users=120, items=40)
    args = [
        *TRAIN,
        f"dataset.path={tmp_path / 'x.csv'}",
        "model=ncf",
        "model.dropout=0.2",
        "trainer.max_epochs=3",
        "trainer.checkpoint.every_n_updates=1",
    ]
    reference = bprun(*args, f"hydra.run.dir={tmp_path}/ref")
    total = reference.metrics["updates"]
    expected = model_state(reference.run_dir)
    run_dir = tmp_path / "killed"
    last = run_dir / "checkpoints" / "last.pt"
    proc = start(args, data_dir, run_dir)
    wait_for_update(proc, last, total // 3 + 2)  # mid-epoch 2: the negatives must be redrawn
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_at = saved_update(last)
    assert killed_at < total
    proc = start([f"trainer.resume={run_dir}"], data_dir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and resumed_at(killed_at, out), out
    got = model_state(run_dir)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert json.loads((run_dir / "metrics.json").read_text())["test"] == reference.metrics["test"]


def test_ids_that_concatenate_alike_stay_apart(tmp_path):
    """(user 1, item 23) and (user 12, item 3) are two interactions, not one repeated."""
    rows = [(1, 23, 0), (12, 3, 0), (1, 5, 1), (12, 5, 1), (1, 6, 2), (12, 6, 2), (1, 23, 3)]
    pd.DataFrame(rows, columns=["uid", "iid", "ts"]).to_csv(tmp_path / "x.csv", index=False)
    ds = load(tmp_path / "x.csv", eval_negatives=1, negatives=1)
    users, items = ds.state["users"], ds.state["items"]
    test = {(users[u], items[i]) for u, i in ds.x_test[:, :2].tolist()}
    assert test == {("1", "23"), ("12", "6")}  # user 1's repeat of item 23 counts at its last time
    assert len(ds.x_train) + len(ds.x_val) + len(ds.x_test) == 6


def test_ranks_read_disjoint_rows_of_one_draw_of_negatives(tmp_path):
    """Two ranks' shares of each batch, negatives included, make up one process's batch."""
    from bprun.data import InMemoryLoader

    write_interactions(tmp_path / "x.csv", users=60)
    ds = load(tmp_path / "x.csv")

    def loader(batch):
        return InMemoryLoader(ds.x_train, ds.y_train, batch, True, 5, epoch_inputs=ds.epoch_inputs)

    # a per-rank batch of 16 on 2 ranks is the global batch of 32 of one process
    one, rank0, rank1 = loader(32), loader(16).shard(0, 2), loader(16).shard(1, 2)
    for epoch in (0, 1):
        whole = [x for x, _ in one.batches(epoch)]
        shares = zip(rank0.batches(epoch), rank1.batches(epoch), strict=True)
        assert len(whole) == len(rank0) > 1
        for b, ((a, _), (c, _)) in enumerate(shares):
            assert torch.equal(torch.cat([a, c]), whole[b])
            assert a[:, 2:].shape[1] == 4
