"""Mistakes that only a constructor, the first forward pass or a scheduler step shows: one
`error:` line naming the group, option and key; and the rehearsal of an update changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bprun.checks import compose
from bprun.config import register_configs

register_configs()


def fails(result) -> str:
    """The one error line of a rejected command, checked for what every rejection holds."""
    assert result.returncode == 1, result.output[-2000:]
    assert "Traceback" not in result.output and "stack trace" not in result.output
    assert not result.run_dir.exists()
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, result.output[-2000:]
    return lines[0]


def test_a_typo_in_the_first_part_of_a_dotted_key_says_did_you_mean(bprun):
    line = fails(bprun("trainr.max_epochs=3", check=False))
    assert "did you mean trainer.max_epochs?" in line
    assert "+trainr" not in line


def test_a_new_top_level_key_nothing_close_to_says_when_a_plus_is_wanted(bprun):
    line = fails(bprun("myproject.width=3", check=False))
    assert "+myproject.width=3" in line


def test_top_level_keys_are_typed(bprun):
    line = fails(bprun("seed=abc", check=False))
    assert line.startswith("error: seed=abc:") and "Integer" in line


def test_a_run_folder_under_a_file_is_one_error_line(bprun, tmp_path):
    (tmp_path / "afile").write_text("")
    result = bprun(f"hydra.run.dir={tmp_path}/afile/run", check=False)
    assert result.returncode == 1 and "Traceback" not in result.output
    line = [ln for ln in result.output.splitlines() if ln.startswith("error: ")][0]
    assert f"{tmp_path}/afile is a file" in line and "choose another hydra.run.dir" in line


def test_what_the_first_scheduler_step_rejects_names_the_key(bprun):
    line = fails(bprun("sched=onecycle", "sched.div_factor=0", check=False))
    assert line.startswith("error: sched=onecycle could not be built with sched.div_factor=0: ")
    assert "ZeroDivisionError" in line and line.endswith("(check sched.div_factor)")


def test_a_negative_schedule_length_is_refused(bprun):
    line = fails(bprun("sched=cosine", "sched.T_max=-3", check=False))
    assert "sched.T_max=-3" in line and "at least 1" in line


def test_an_error_in_a_models_own_forward_names_its_class(bprun, tmp_path):
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "class Picky(torch.nn.Module):\n"
        "    def __init__(self, input_shape, num_classes, **settings):\n"
        "        super().__init__()\n"
        "        self.lin = torch.nn.Linear(3, num_classes)\n"
        "    def forward(self, x):\n"
        "        raise ValueError('Picky takes images, not sequences')\n"
    )
    line = fails(bprun("model._target_=mymodels.Picky", check=False))
    assert line.startswith("error: model=mymodels.Picky could not be built with ")
    assert "first forward pass" in line and "ValueError: Picky takes images" in line


def test_a_language_models_first_forward_pass_is_rehearsed(bprun, tmp_path):
    """Token windows are rehearsed like in-memory rows: a model that fails on them fails
    before the run folder, in one line naming its class."""
    (tmp_path / "mylm.py").write_text(
        "import torch\n"
        "class Causal(torch.nn.Module):\n"
        "    reads = 'tokens'\n"
        "    def __init__(self, input_shape, num_classes, **settings):\n"
        "        super().__init__()\n"
        "        self.emb = torch.nn.Embedding(num_classes, 4)\n"
        "    def forward(self, x):\n"
        "        raise ValueError(f'Causal needs a context of 32, got {x.shape[1]}')\n"
    )
    (tmp_path / "corpus.txt").write_text("to be or not to be, that is the question. " * 50)
    line = fails(bprun(
        "experiment=char_gpt_cpu", f"dataset.path={tmp_path / 'corpus.txt'}",
        "dataset.block_size=16", "model._target_=mylm.Causal", check=False,
    ))  # fmt: skip
    assert line.startswith("error: model=mylm.Causal could not be built with ")
    assert "first forward pass" in line and "a context of 32, got 16" in line


def test_debug_shows_the_traceback(bprun, monkeypatch):
    monkeypatch.setenv("BPRUN_DEBUG", "1")
    result = bprun("sched=onecycle", "sched.div_factor=0", check=False)
    assert result.returncode == 1 and "ZeroDivisionError" in result.output
    assert "could not be built" not in result.output


@pytest.mark.slow
def test_the_rehearsed_update_leaves_the_run_as_it_was(tmp_path, data_dir, monkeypatch):
    """Same seed, same metrics with and without the dry run (dropout and BatchNorm draw on
    and change state in the forward pass; the step schedule's state moves in a step)."""
    import bprun.tasks.setup as setup
    from bprun.tasks import run_task

    line = [
        "model=cnn",
        "model.channels=[4,8]",
        "sched=step",
        "sched.step_size=1",
        "sched.interval=step",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=1",
        "trainer.threads=1",
        "trainer.progress=false",
        f"paths.data_dir={data_dir}",
    ]
    runs = {}
    for rehearse in (True, False):
        if not rehearse:
            monkeypatch.setattr(setup, "dry_run", lambda *args, **kwargs: None)
        run_dir = Path(tmp_path / f"rehearse_{rehearse}")
        run_dir.mkdir()
        run_task(compose(line), run_dir, line)
        runs[rehearse] = json.loads((run_dir / "metrics.json").read_text())
    with_it, without = runs[True], runs[False]
    assert with_it["test"] == without["test"]

    def strip(history):  # timings differ from run to run
        return [
            {k: v for k, v in e.items() if "time" not in k and "throughput" not in k}
            for e in history
        ]

    assert strip(with_it["history"]) == strip(without["history"])


@pytest.mark.slow
def test_a_compiler_that_fails_under_trainer_compile_is_one_error_line(tmp_path, data_dir):
    """inductor's C++ step failing (here a g++ that exits 1, as one killed for memory does) ends
    with one line naming trainer.compile, not a traceback from inside the compiler."""
    import os
    import subprocess

    from conftest import BPRUN

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "g++").write_text("#!/bin/sh\necho 'g++: fatal error: Killed' >&2\nexit 1\n")
    (fake / "g++").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}  # fmt: skip
    run = [BPRUN, "trainer.compile=true", "trainer.max_updates=3", "model.hidden=[8]",
           f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    out = subprocess.run(run, capture_output=True, text=True, env=env, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 1 and "Traceback" not in text, text[-3000:]
    lines = [ln for ln in text.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith("error: trainer.compile=true: torch.compile")
    assert "set trainer.compile=false" in lines[0]
