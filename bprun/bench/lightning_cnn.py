"""The MNIST-1D paper CNN run through a Lightning Trainer over a DataLoader, as a Lightning
user writes it: `python -m bprun.bench --command` measures bprun against it when `lightning`
is installed (`pip install "bprun[bench]"`).

    python -m bprun.bench.lightning_cnn --data-dir data --out /tmp/lit [--updates 6000]

Same model, optimizer, batches per epoch and length as `bprun.bench.plain_cnn`; Lightning's
defaults otherwise (its TensorBoard logger, a checkpoint per epoch). Last line: `BENCH {json}`.
"""

from __future__ import annotations

import json
import time

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bprun.bench.plain_cnn import accuracy, load_mnist1d, paper_cnn, parse


class PaperCNN(L.LightningModule):
    def __init__(self, lr: float):
        super().__init__()
        self.net, self.lr = paper_cnn(), lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main(argv=None) -> None:
    args = parse(argv, "Lightning")
    torch.set_num_threads(args.threads)
    x, y, x_test, y_test = load_mnist1d(args.data_dir, torch.device("cpu"))
    torch.manual_seed(args.seed)
    model = PaperCNN(args.lr)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=True)
    trainer = L.Trainer(
        max_steps=args.updates,
        max_epochs=args.epochs,
        accelerator=args.device,
        devices=1,
        default_root_dir=args.out,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, loader)
    fit_s = time.perf_counter() - start
    device = next(model.parameters()).device
    acc = accuracy(model.net, x_test.to(device), y_test.to(device))
    print("BENCH " + json.dumps({"fit_s": fit_s, "updates": trainer.global_step, "test_acc": acc}))


if __name__ == "__main__":
    main()
