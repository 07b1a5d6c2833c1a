"""The MNIST-1D paper CNN run written by hand in plain PyTorch: the script `bprun
+experiment=mnist1d_paper_cnn` is measured against by `python -m bprun.bench --command`.

    python -m bprun.bench.plain_cnn --data-dir data [--updates 6000] [--threads 1] [--device cpu]

The same work as the experiment: the 5,210-parameter CNN, Adam at lr 1e-2 as a user builds
it (torch's default kernel), batches of 100 from a fresh permutation each epoch, 6000 updates,
then the test accuracy. It reads the MNIST-1D tensors bprun caches under the data dir and
imports nothing but torch, as a script would. The last line is `BENCH {json}` for the bench.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

MNIST1D_CACHE = "mnist1d/mnist1d_n5000_seed42.pt"


def paper_cnn() -> nn.Module:
    """Three Conv1d layers of 25 channels (lengths 40 -> 19 -> 10 -> 5) and a linear head."""
    return nn.Sequential(
        nn.Conv1d(1, 25, 5, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(25, 25, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(25, 25, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(25 * 5, 10),
    )


def load_mnist1d(data_dir: str, device: torch.device):
    arrays = torch.load(Path(data_dir) / MNIST1D_CACHE, weights_only=True)
    x, y = arrays["x"].float().unsqueeze(1), arrays["y"].long()
    x_test, y_test = arrays["x_test"].float().unsqueeze(1), arrays["y_test"].long()
    return x.to(device), y.to(device), x_test.to(device), y_test.to(device)


def parse(argv=None, what: str = "plain PyTorch") -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=f"The MNIST-1D paper CNN in {what}")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--updates", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="a folder for the tool's logs, if it has any")
    return parser.parse_args(argv)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def main(argv=None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x, y, x_test, y_test = load_mnist1d(args.data_dir, device)
    torch.manual_seed(args.seed)
    model = paper_cnn().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    done = 0
    for _ in range(args.epochs):
        model.train()
        for idx in torch.randperm(len(x), device=device).split(args.batch_size):
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
            if done == args.updates:
                break
        print(f"epoch loss {loss.item():.4f}")  # what a script prints once per epoch
        if done == args.updates:
            break
    fit_s = time.perf_counter() - start
    result = {"fit_s": fit_s, "updates": done, "test_acc": accuracy(model, x_test, y_test)}
    print("BENCH " + json.dumps(result))


if __name__ == "__main__":
    main()
