"""End-to-end: the real `bprun` command, its outputs and its errors."""

from __future__ import annotations

import subprocess

from conftest import BPRUN

from bprun.problems.classification import Classification


def test_default_run_writes_run_folder_and_seed_zero_is_honoured(bprun, tmp_path):
    r = bprun("trainer.max_epochs=2", f"hydra.run.dir={tmp_path}/b")
    m = r.metrics
    assert m["status"] == "completed"
    assert m["epochs"] == 2 and m["updates"] == 2 * 36  # 3600 train samples / batch 100
    assert set(m["test"]) == {f"test/{n}" for n in ["loss", *Classification(10).selected]}
    assert m["problem"] == "classification" and (r.run_dir / "test_per_class.json").is_file()
    assert m["best"]["epoch"] in (1, 2) and "val/acc" in m["best"]
    assert m["wall_time_s"] > 0
    assert (r.run_dir / ".hydra" / "config.yaml").is_file()
    assert list(r.run_dir.glob("events.out.tfevents.*"))
    assert "Result" in r.stdout and "test/acc" in r.stdout and str(r.run_dir) in r.stdout

    # the same seed gives the same metrics (the default is 0), another seed others
    a = bprun("trainer.max_epochs=2", "seed=0", f"hydra.run.dir={tmp_path}/a").metrics
    c = bprun("trainer.max_epochs=2", "seed=1", f"hydra.run.dir={tmp_path}/c").metrics
    assert a["history"] == [
        {
            **h,
            "time/epoch_s": a["history"][i]["time/epoch_s"],
            "throughput/samples_per_s": a["history"][i]["throughput/samples_per_s"],
        }
        for i, h in enumerate(m["history"])
    ]
    assert a["test"] == m["test"]
    assert a["test"] != c["test"]


def test_typo_in_trainer_key_fails_at_compose(bprun):
    r = bprun("trainer.max_epoch=3", check=False)
    assert r.returncode != 0
    assert "max_epoch" in r.output and "Traceback" not in r.output


def test_unknown_group_option_lists_choices(bprun):
    r = bprun("model=cnnn", check=False)
    assert r.returncode != 0
    assert "cnnn" in r.output and "mlp" in r.output and "cnn" in r.output
    assert "Traceback" not in r.output


def test_help_lists_groups_and_options():
    out = subprocess.run([BPRUN, "--help"], capture_output=True, text=True, timeout=60).stdout
    for word in (
        "dataset:",
        "model:",
        "optim:",
        "sched:",
        "trainer:",
        "mnist1d",
        "adamw",
        "cosine",
    ):
        assert word in out


def test_python_dash_m_entry_point(tmp_path, data_dir):
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bprun",
            f"hydra.run.dir={tmp_path}/r",
            f"paths.data_dir={data_dir}",
            "trainer.fast_dev_run=true",
            "trainer.threads=1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "r" / "metrics.json").is_file()


def test_seed_everything_seeds_python_numpy_and_torch():
    """What a run's `seed` decides beyond the data split: initial weights, dropout, shuffles."""
    import random

    import numpy as np
    import torch

    from bprun.tasks.setup import seed_everything

    def draws(seed):
        seed_everything(seed)
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    first, again, other = draws(7), draws(7), draws(8)
    assert first == again
    assert all(a != b for a, b in zip(first, other, strict=True))
