"""What a classification run writes beside its metrics: the confusion matrix (JSON, PNG and a
TensorBoard image) and the per-class table (precision, recall, F1, support), also printed."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from bprun.io import write_json

log = logging.getLogger("bprun")

MAX_PRINTED = 30  # rows of the per-class table printed; the JSON holds them all


def per_class_rows(cm: torch.Tensor, names: list[str]) -> list[dict]:
    """One row per class of a (targets x predictions) confusion matrix."""
    cm = cm.double()
    support, predicted, tp = cm.sum(1), cm.sum(0), cm.diagonal()
    precision = (tp / predicted.clamp(min=1)).tolist()
    recall = (tp / support.clamp(min=1)).tolist()
    f1 = (2 * tp / (support + predicted).clamp(min=1)).tolist()
    return [
        {
            "class": names[i],
            "precision": precision[i],
            "recall": recall[i],
            "f1": f1[i],
            "support": int(support[i]),
        }
        for i in range(len(names))
    ]


def table(rows: list[dict], columns: tuple[str, ...], title: str) -> str:
    """A plain console table of `rows`, worst F1 first when they do not all fit."""
    shown = rows
    if len(rows) > MAX_PRINTED:
        shown = sorted(rows, key=lambda r: r.get("f1", 0.0))[:MAX_PRINTED]
        title += f" (the {MAX_PRINTED} lowest F1 of {len(rows)}; all in the JSON)"
    width = max(8, *(len(str(r[columns[0]])) for r in shown))
    head = f"{columns[0]:<{width}}" + "".join(f"{c:>11}" for c in columns[1:])
    lines = [title, head]
    for r in shown:
        cells = "".join(
            f"{r[c]:>11}" if isinstance(r[c], int) else f"{r[c]:>11.4f}" for c in columns[1:]
        )
        lines.append(f"{str(r[columns[0]]):<{width}}{cells}")
    return "\n".join(lines)


def write_class_report(
    cm: torch.Tensor, names: list[str], folder: Path, prefix: str, tracker=None
) -> list[dict]:
    folder = Path(folder)
    rows = per_class_rows(cm, names)
    write_json(
        {"classes": names, "matrix": cm.tolist(), "rows": "targets", "columns": "predictions"},
        folder / f"{prefix}_confusion_matrix.json",
    )
    write_json(rows, folder / f"{prefix}_per_class.json")
    figure = confusion_figure(cm, names, prefix)
    # One render serves the PNG and TensorBoard's image: drawing the figure (a hundred cell
    # labels) is most of a small model's report, and a search pays it in every trial.
    pixels = rendered(figure)
    from PIL import Image

    Image.fromarray(pixels).save(folder / f"{prefix}_confusion_matrix.png")
    if tracker is not None and hasattr(tracker, "image"):
        tracker.image(f"{prefix}/confusion_matrix", pixels)
    import matplotlib.pyplot as plt

    plt.close(figure)
    columns = ("class", "precision", "recall", "f1", "support")
    log.info(table(rows, columns, f"{prefix} split, per class:"))
    return rows


def rendered(figure):
    """The figure's pixels as an (H, W, 3) uint8 array, drawn once by Agg at its own dpi
    (what savefig(dpi=100) writes for a figure of matplotlib's default 100 dpi)."""
    import numpy as np

    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def confusion_figure(cm: torch.Tensor, names: list[str], prefix: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    size = min(4 + 0.4 * n, 24)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    rows = cm.double() / cm.sum(1, keepdim=True).clamp(min=1)  # each row: where a class went
    ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        ax.set_xticks(range(n), names, rotation=90)
        ax.set_yticks(range(n), names)
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    color = "white" if rows[i, j] > 0.5 else "black"
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", color=color, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{prefix}: confusion matrix (colour: fraction of each true class)")
    # Margins from the longest tick label (10 pt: about 0.08 in a character), not
    # tight_layout, which draws the whole figure once more to measure it.
    longest = max((len(str(name)) for name in names), default=1) if n <= 30 else 2
    margin = (0.75 + 0.08 * longest) / size
    fig.subplots_adjust(left=margin, bottom=margin, right=1 - 0.25 / size, top=1 - 0.45 / size)
    return fig
