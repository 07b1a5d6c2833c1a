"""Two searches on one PostgreSQL study: a real server, started here on 127.0.0.1.

`.ci/run` installs PostgreSQL from the distribution's packages; where CI=true a
missing server is a failure, elsewhere the test is skipped.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from optuna.trial import TrialState
from search_helpers import load, param_sets
from test_search import check_stale_other_host_trial_is_released, search_args


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL server in a temporary folder; yields its URL."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL (initdb, pg_ctl) is not installed: .ci/run installs it")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    # The server refuses to run as root: run it as the postgres user where we are root.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="bprun-pg-"))
    if as_user:
        shutil.chown(root, "postgres")
    data, port = root / "data", _free_port()
    run = dict(check=True, capture_output=True, text=True, timeout=120)
    subprocess.run([*as_user, initdb, "-A", "trust", "-U", "postgres", "-D", str(data)], **run)
    options = f"-h 127.0.0.1 -p {port} -k {root} -F"
    subprocess.run(
        [*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"],
        **run,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_searches_share_one_postgresql_study(postgres, tmp_path, data_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            search_args(
                tmp_path / f"sweep{i}",
                data_dir,
                f"search.storage={postgres}",
                "search.study_name=shared",
                "search.n_trials=4",
                "search.n_jobs=1",
                "search.pruner=none",
                "trainer.max_epochs=2",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    study = load(postgres, "shared")
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(4))
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert len(set(param_sets(study.trials))) == 4
    # Every trial ran once, in the folder of the search that asked it.
    ran = [p.name for i in range(2) for p in (tmp_path / f"sweep{i}").iterdir() if p.name.isdigit()]
    assert sorted(map(int, ran)) == list(range(4)), ran


def test_stale_other_host_trial_in_postgresql_is_released(postgres, tmp_path):
    check_stale_other_host_trial_is_released(tmp_path, postgres)
