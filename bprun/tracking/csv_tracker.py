"""`metrics.csv` in the run folder: one row per logged step, a column per metric."""

from __future__ import annotations

import csv
from pathlib import Path


class CsvBackend:
    """Rows merge the metrics logged at one step (the trainer logs an epoch's last update
    and the epoch's metrics apart). A row is written when a later step begins, so the file
    is appended to; a new metric (the first validation, the test metrics) rewrites it
    with the wider header. A resumed run keeps the rows before its checkpoint's step."""

    def __init__(self, run_dir: Path, purge_step: int | None = None):
        self.path = Path(run_dir) / "metrics.csv"
        self.columns: list[str] = ["step"]
        self.rows: list[dict] = []
        self.written = 0  # rows in the file
        if purge_step is not None and self.path.is_file():
            with self.path.open(newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or ["step"])
                for row in reader:
                    if int(row["step"]) < purge_step:
                        self.rows.append({k: v for k, v in row.items() if v != ""})
            self._rewrite(len(self.rows))

    def start(self) -> None:
        pass

    def handle(self, kind: str, items: list) -> None:
        if kind != "metrics":
            if kind == "finish":
                self._flush(len(self.rows))
            return
        wider = False
        for scalars, step, _ in items:
            if self.rows and int(self.rows[-1]["step"]) == step and len(self.rows) > self.written:
                self.rows[-1].update(scalars)
            else:
                self.rows.append({"step": step, **scalars})
            for key in scalars:
                if key not in self.columns:
                    self.columns.append(key)
                    wider = True
        done = len(self.rows) - 1  # the last row may still grow
        if wider:
            self._rewrite(done)
        else:
            self._flush(done)

    def _flush(self, upto: int) -> None:
        if upto <= self.written:
            return
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            if new:
                writer.writeheader()
            writer.writerows(self.rows[self.written : upto])
        self.written = upto

    def _rewrite(self, upto: int) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows(self.rows[:upto])
        tmp.replace(self.path)
        self.written = upto

    def stop(self) -> None:
        self._flush(len(self.rows))
