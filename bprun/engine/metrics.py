"""Evaluation metrics that follow the task, accumulated on the device and read once."""

from __future__ import annotations

import torch


class Metrics:
    """Sums over an evaluation pass; `compute()` makes the single host read.

    classification: acc (and top5 when there are more than 5 classes); soft targets (class
    probabilities, as mixup makes) count their argmax as the label
    regression: mae and rmse over all output elements
    """

    def __init__(self, task: str = "classification", num_classes: int = 0):
        if task not in ("classification", "regression"):
            raise ValueError(f"task must be classification or regression, got '{task}'")
        self.task, self.num_classes = task, num_classes
        self.sums: torch.Tensor | None = None
        self.count = 0  # samples
        self.elements = 0  # output elements (regression)

    @staticmethod
    def names(task: str, num_classes: int, prefix: str) -> list[str]:
        """The metrics `compute(prefix)` gives for this task, known before any data is seen."""
        if task == "classification":
            return [
                f"{prefix}/{m}" for m in ("loss", "acc", *(["top5"] if num_classes > 5 else []))
            ]
        return [f"{prefix}/{m}" for m in ("loss", "mae", "rmse")]

    def update(self, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> None:
        n = y.shape[0]
        out = out.detach().float()
        if self.task == "classification":
            if y.is_floating_point() and y.dim() == 2:
                y = y.argmax(1)
            top = out.topk(min(5, out.shape[1]), dim=1).indices
            hits = top == y.view(-1, 1)
            row = torch.stack([loss.detach().float() * n, hits[:, 0].sum(), hits.any(1).sum()])
        else:
            err = out - y.view_as(out).float()
            row = torch.stack([loss.detach().float() * n, err.abs().sum(), err.pow(2).sum()])
            self.elements += err.numel()
        self.sums = row if self.sums is None else self.sums + row
        self.count += n

    def reduce(self, dist, device: torch.device) -> None:
        """Sum the counts of all ranks (each evaluated its own part of the data), so that
        every sample is counted once and every rank computes the same metrics."""
        sums = self.sums if self.sums is not None else torch.zeros(3, device=device)
        counts = torch.tensor([self.count, self.elements], dtype=torch.float64, device=device)
        t = torch.cat([sums.double(), counts])
        dist.sum_(t)
        self.sums = t[:3] if t[3] > 0 else None
        self.count, self.elements = int(t[3]), int(t[4])

    def compute(self, prefix: str) -> dict[str, float]:
        if self.sums is None:
            return {}
        loss_sum, a, b = self.sums.tolist()
        metrics = {f"{prefix}/loss": loss_sum / self.count}
        if self.task == "classification":
            metrics[f"{prefix}/acc"] = a / self.count
            if self.num_classes > 5:
                metrics[f"{prefix}/top5"] = b / self.count
        else:
            metrics[f"{prefix}/mae"] = a / self.elements
            metrics[f"{prefix}/rmse"] = (b / self.elements) ** 0.5
        return metrics
