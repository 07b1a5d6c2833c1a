"""What a run prints when it ends."""

from __future__ import annotations


def result_table(summary: dict) -> str:
    """The short table printed at the end of a run."""
    monitor = summary["monitor"]
    best, test = summary.get("best", {}), summary.get("test", {})
    rows = []
    if best:
        rows.append((f"best {monitor}", f"{best[monitor]:.4f}  (epoch {best['epoch']})"))
        for k, v in best.items():
            if k.startswith("val/") and k != monitor:
                rows.append((f"  {k}", f"{v:.4f}"))
    for k, v in test.items():
        rows.append((k, f"{v:.4f}"))
    rows += [
        ("epochs", str(summary["epochs"])),
        ("updates", str(summary["updates"])),
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
        ("stopped", summary.get("stop_reason") or "-"),
        ("run folder", summary["run_dir"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["", "Result"] + [f"  {k:<{width}}  {v}" for k, v in rows])
