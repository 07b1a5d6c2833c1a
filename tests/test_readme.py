"""The README's examples run as written, so the README cannot drift from the code.

Files shown in the README with a `# file: <path>` first line are written to
the working directory; every `bprun ...` line of a bash block then runs with a
short training budget appended.
"""

from __future__ import annotations

import re
import shlex

import pytest
from conftest import ROOT

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)
COMMANDS = [
    line.split("#")[0].strip()
    for lang, body in BLOCKS
    if lang == "bash"
    for line in body.splitlines()
    if line.startswith("bprun ") and "<" not in line
]
FILES = {
    body.splitlines()[0].split("file:", 1)[1].strip(): body
    for _, body in BLOCKS
    if body.startswith("# file:")
}


def test_readme_opens_with_the_two_commands():
    first_block = BLOCKS[0][1]
    assert "make run" in first_block and "make test" in first_block


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs(command, bprun, tmp_path):
    for name, body in FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(body)
    args = shlex.split(command)[1:]
    if "--help" in args or "--cfg" in args:
        r = bprun(*args)
        assert "model" in r.stdout
        return
    budget = ["trainer.max_epochs=1", "trainer.max_updates=5"]
    if any(a in ("task=meta", "experiment=maml_sine") for a in args):  # no epochs: iterations
        budget = ["meta.iterations=5", "meta.eval_tasks=10"]
    if any(a.startswith(("search=", "hydra/sweeper=optuna")) for a in args):
        budget += ["search.n_trials=2", "search.n_jobs=1"]  # a search: two short trials
    r = bprun(*args, *budget, cwd=tmp_path)
    if "-m" in args:
        assert (r.run_dir.parent / "sweep" / "summary.csv").is_file()
    elif not any(a.startswith("task=") for a in args):
        assert r.metrics["status"] == "completed"
