"""Charts drawn with matplotlib's Agg canvas (no pyplot, no display, no global backend),
saved as PNG in the run folder and logged to TensorBoard as images."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def grad_flow_figure(
    names: list[str],
    mean_abs: list[float],
    max_abs: list[float],
    title: str,
) -> Figure:
    """The classic gradient-flow chart: max and mean |gradient| per layer, input to output,
    on a log scale so that gradients vanishing by orders of magnitude stay visible."""
    fig = Figure(figsize=(max(6.0, 0.35 * len(names) + 2.0), 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(len(names))
    tiny = 1e-30
    ax.bar(x, [_pos(v, tiny) for v in max_abs], width=0.8, color="c", alpha=0.6, label="max |grad|")
    ax.bar(x, [_pos(v, tiny) for v in mean_abs], width=0.5, color="b", label="mean |grad|")
    ax.set_yscale("log")
    ax.set_xticks(x, names, rotation=90, fontsize=7)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_xlabel("layer (input to output)")
    ax.set_ylabel("|gradient|")
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def lr_find_figure(
    lrs: list[float], losses: list[float], index: int | None, suggestion: float | None
) -> Figure:
    """Smoothed loss against learning rate (log x), the suggestion marked in red."""
    fig = Figure(figsize=(6.4, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(lrs, losses)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("smoothed training loss")
    if index is not None and suggestion is not None:
        ax.plot(
            lrs[index],
            losses[index],
            marker="o",
            markersize=10,
            color="red",
            label=f"suggestion {suggestion:.3g}",
        )
        ax.legend(loc="best")
    ax.set_title("learning-rate range test")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def _pos(value: float, tiny: float) -> float:
    """Bars on a log axis: zero becomes `tiny`, non-finite values are not drawn."""
    if not math.isfinite(value):
        return float("nan")
    return max(value, tiny)


def to_rgb(fig: Figure) -> np.ndarray:
    """The rendered figure as an (H, W, 3) uint8 array."""
    canvas = fig.canvas
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save(fig: Figure, path: Path, writer=None, tag: str = "", step: int = 0) -> Path:
    """PNG at `path` and, given a SummaryWriter, the same image under `tag`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    if writer is not None:
        writer.add_image(tag, to_rgb(fig), step, dataformats="HWC")
    return path
