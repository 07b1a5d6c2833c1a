"""search.workers: trials on long-lived worker processes keep what per-trial processes give."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from optuna.trial import TrialState
from search_helpers import FAST, load

from bprun.errors import BprunError
from bprun.search.settings import SearchSettings

BPRUN = os.path.join(os.path.dirname(os.sys.executable), "bprun")

# A model builder that misbehaves on chosen trials (by the job's number), and writes the
# process id it ran in to the trial's folder.
FLAKY = """
import os, time
from hydra.core.hydra_config import HydraConfig
from bprun.models import MLP

def build(**kwargs):
    hc = HydraConfig.get()
    with open(os.path.join(hc.runtime.output_dir, "pid"), "w") as f:
        f.write(str(os.getpid()))
    if os.environ.get("FLAKY") == "on":
        if hc.job.num == 1:
            raise RuntimeError("this trial raises on purpose")
        if hc.job.num == 2:
            time.sleep(600)
    return MLP(**kwargs)
"""


def search(tmp_path, data_dir, name, flaky, *extra):
    (tmp_path / "flaky_mlp.py").write_text(FLAKY)
    sweep = tmp_path / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLAKY": flaky}
    args = [
        BPRUN, "-m", "search=mlp_lr", f"hydra.sweep.dir={sweep}", f"paths.data_dir={data_dir}",
        "trainer.threads=1", "trainer.progress=false", *FAST, "model._target_=flaky_mlp.build",
        "search.n_trials=5", "search.n_jobs=1", "search.sampler=random", "search.seed=3",
        "search.pruner=none", "trainer.checkpoint.enabled=false", *extra,
    ]  # fmt: skip
    r = subprocess.run(
        args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=400, check=False
    )
    # A search whose trials failed says so in its exit code, after running all of them.
    assert r.returncode == (1 if flaky == "on" else 0), r.stdout[-3000:] + r.stderr[-3000:]
    return sweep, load(sweep / "optuna.journal", "mlp_lr").trials


@pytest.mark.slow
def test_a_raising_and_a_hanging_trial_do_not_stop_the_search(tmp_path, data_dir):
    sweep, trials = search(
        tmp_path, data_dir, "workers", "on", "search.workers=1", "search.trial_timeout=60"
    )
    assert [t.state for t in trials] == [
        TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE,
        TrialState.COMPLETE,
    ]  # fmt: skip
    errors = [json.loads((sweep / f"{n}" / "trial.json").read_text())["error"] for n in (1, 2)]
    assert "this trial raises on purpose" in errors[0]
    assert "search.trial_timeout=60" in errors[1]
    pid = {n: (sweep / f"{n}" / "pid").read_text() for n in (0, 1, 2, 3, 4)}
    assert pid[0] == pid[1] != pid[2] != pid[3] == pid[4]  # a fresh worker after each failure
    # The same trials, each in per-process mode, without the failures: equal results.
    _, alone = search(tmp_path, data_dir, "per_process", "off", "search.workers=0")
    for n in (0, 3, 4):
        assert trials[n].params == alone[n].params
        assert trials[n].value == alone[n].value


@pytest.mark.parametrize(
    "extra, message",
    [
        (["hydra/launcher=submitit_slurm", "search.workers=2"], "search.workers=2 runs trials in"),
        (["search.workers=1", "search.trial_timeout=0"], "search.trial_timeout=0"),
        (
            ["search.pruner=successive_halving", "search.min_resource=5", "trainer.max_epochs=5"],
            "has its first rung at epoch 5, not before the last of trainer.max_epochs=5",
        ),
    ],
)
def test_bad_worker_and_pruner_settings_fail_before_any_trial(bprun, tmp_path, extra, message):
    r = bprun("-m", "search=mlp_lr", *extra, check=False)
    assert r.returncode == 1, r.output
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert message in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "sweep" / "0").exists()
    assert not (tmp_path / "sweep" / "optuna.journal").exists()


def test_settings_reject_a_timeout_and_workers_below_zero():
    with pytest.raises(BprunError, match="must be more than 0 seconds"):
        SearchSettings(trial_timeout=-1).validate()
    with pytest.raises(BprunError, match="search.workers=-1"):
        SearchSettings(workers=-1).validate()
    with pytest.raises(BprunError, match="no trial could be pruned"):
        SearchSettings(n_warmup_steps=4).check_epochs(4)


def test_a_workers_trial_config_equals_hydras_own_composition():
    """The worker applies a trial's values to a kept config; the result is the config Hydra
    composes from scratch, Hydra's record of the overrides included."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from bprun.config import register_configs
    from bprun.search.compose import TrialComposer

    register_configs()
    trials = [
        ["optim=adamw", "optim.lr=0.1", "search.trial=0", "search.storage='/tmp/a b'"],
        ["optim=adam", "optim.lr=0.2", "model.hidden=[64,64]", "search.trial=1"],
        ["optim=adamw", "optim.lr=0.3", "model.dropout=0.5", "search.trial=2"],
        ["optim=adamw", "optim.lr=0.4", "dataset.batch_size=32", "search.trial=3"],
    ]
    with initialize_config_module("bprun.conf", version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration(
            "config",
            overrides=["search=mlp_lr", "hydra.sweep.dir=/tmp/x"],
            run_mode=RunMode.MULTIRUN,
        )
        composer = TrialComposer(loader, master)
        for overrides in trials:
            kept = OmegaConf.to_yaml(composer.compose(overrides))
            assert kept == OmegaConf.to_yaml(loader.load_sweep_config(master, overrides))
        assert len(composer.bases) == 2  # one per optimizer after the first trial
        # Trials that set the same keys (as a search's do) start from the first one's config:
        # one composition for the two.
        composer = TrialComposer(loader, master)
        composed = []
        compose = loader.load_sweep_config
        loader.load_sweep_config = lambda *a: composed.append(a) or compose(*a)
        try:
            for lr in (0.1, 0.2):
                overrides = ["optim=adamw", f"optim.lr={lr}", f"search.trial={lr * 10:.0f}"]
                kept = OmegaConf.to_yaml(composer.compose(overrides))
                assert kept == OmegaConf.to_yaml(compose(master, overrides))
        finally:
            del loader.load_sweep_config
        assert len(composed) == 1
        with pytest.raises(Exception, match="optim.lrr"):
            composer.compose(["optim=adamw", "optim.lrr=0.1"])
