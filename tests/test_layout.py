"""The shape of the code: light start-up, one-way imports, plugins where Hydra looks."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from conftest import ROOT

PACKAGE = ROOT / "bprun"


def imports_of(path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def sources():
    return [*PACKAGE.rglob("*.py"), *(ROOT / "hydra_plugins").rglob("*.py")]


@pytest.mark.parametrize(
    "args",
    [["--help"], ["--cfg", "job"], ["trainer.max_epoch=3"], ["model=cnnn"]],
    ids=["help", "cfg-job", "typo", "unknown-option"],
)
def test_no_torch_before_the_config_is_valid(args, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "bprun", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()}
    assert "torch" not in imported, "torch was imported"
    assert "bprun.cli" in imported  # the measurement itself works
    assert not list(tmp_path.glob("outputs/*/*/"))  # no run folder for help or a rejected line


# The search's trial workers run jobs in-process as Hydra's launchers do (run_job, HydraConfig),
# and apply each trial's overrides with Hydra's own override code (search/compose.py, checked
# against Hydra's composition by tests/test_search_workers.py; hydra-core is pinned below 1.4).
LAUNCHER_SIDE = {PACKAGE / "search" / "workers.py", PACKAGE / "search" / "compose.py"}
# The command line hands Hydra the `hydra.mode` its check composed, in place of Hydra's own
# second composition of the whole config (`Hydra.get_mode`; tests/test_start.py counts them).
COMMAND_SIDE = {PACKAGE / "cli.py"}


def test_no_module_uses_hydra_internals():
    for path in sources():
        if path in LAUNCHER_SIDE | COMMAND_SIDE:
            continue
        assert not any(m.startswith("hydra._internal") for m in imports_of(path)), path


def test_only_the_command_line_tasks_and_plugins_read_hydra_config():
    allowed = {PACKAGE / "cli.py", *(PACKAGE / "tasks").glob("*.py"), *LAUNCHER_SIDE}
    allowed |= set((ROOT / "hydra_plugins").rglob("*.py"))
    for path in sources():
        if path not in allowed:
            assert "HydraConfig" not in path.read_text(), path


@pytest.mark.parametrize(
    "package, forbidden",
    [
        (
            "engine",
            ("bprun.tasks", "bprun.build", "bprun.cli", "bprun.sweep", "bprun.tracking")
            + ("bprun.optim",),  # bprun.optim and bprun.optimizers: the engine sees objects
        ),
        ("optimizers", ("bprun.tasks", "bprun.cli", "bprun.build", "bprun.engine")),
        ("diagnostics", ("bprun.tasks", "bprun.cli", "bprun.build")),
        ("data", ("bprun.tasks", "bprun.cli", "bprun.build", "bprun.engine.trainer")),
        ("models", ("bprun.tasks", "bprun.cli", "bprun.build", "bprun.engine")),
        ("tracking", ("bprun.tasks", "bprun.cli", "bprun.build")),
        ("meta", ("bprun.tasks", "bprun.cli", "bprun.build")),
        ("problems", ("bprun.tasks", "bprun.cli", "bprun.build", "bprun.engine")),
    ],
)
def test_imports_run_one_way(package, forbidden):
    for path in (PACKAGE / package).rglob("*.py"):
        bad = [m for m in imports_of(path) if m.startswith(forbidden)]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_tasks_share_one_signature():
    from bprun.tasks import TASKS

    for name, (module, _) in TASKS.items():
        tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
        (run,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run"]
        assert [a.arg for a in run.args.args] == ["cfg", "run_dir", "overrides"], name


def test_every_config_folder_is_a_listed_package():
    """A conf/ folder missing from pyproject's packages makes `make install` warn."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    for folder in (ROOT / "conf").rglob("*"):
        if folder.is_dir() and any(folder.glob("*.yaml")):
            name = "bprun.conf." + ".".join(folder.relative_to(ROOT / "conf").parts)
            assert f'"{name}"' in pyproject, f"add {name} to [tool.setuptools] packages"
