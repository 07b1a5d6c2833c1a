"""Command-line overrides (`key=value`, `+key=value`, `~key`) as plain strings."""

from __future__ import annotations


def key_of(override: str) -> str:
    """`+model.depth=3` -> `model.depth`."""
    return override.split("=", 1)[0].lstrip("+~")


def merge(*lines: list[str]) -> list[str]:
    """One override per key, the latest winning (Hydra refuses a group chosen twice)."""
    merged: dict[str, str] = {}
    for line in lines:
        for override in line:
            merged.pop(key_of(override), None)
            merged[key_of(override)] = override
    return list(merged.values())


def run_overrides(overrides: list[str]) -> list[str]:
    """The overrides that define a run: all but `hydra.*` and `sweep.*` settings, the
    `trainer.resume` a continued sweep adds to an interrupted job, and the `search`
    choice and its `search.*` settings, which only a search reads."""
    return [
        o
        for o in overrides
        if not key_of(o).startswith(("sweep.", "hydra.", "search."))
        and key_of(o) not in ("trainer.resume", "search")
    ]
