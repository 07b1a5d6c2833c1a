"""A sweep on a real SLURM scheduler: a one-node cluster started here (munged, slurmctld
and slurmd on 127.0.0.1, no cgroups), jobs submitted through sbatch by
`hydra/launcher=submitit_slurm` with 2 tasks (DDP ranks) each, and one of them preempted
with `scontrol requeue`.

`.ci/run` installs the distribution's slurm-wlm and munge; where CI=true a cluster
that cannot start is a failure, elsewhere the test is skipped with the daemons' error.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import BPRUN, job_dir
from test_submitit import (
    LONG,
    SAME_TWICE,
    end_session,
    ends_like_the_job_not_stopped,
    wait_for,
)

from hydra_plugins.bprun_submitit import launcher

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "sinfo", "squeue", "scontrol", "scancel", "srun")


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: this test must run; .ci/run installs slurm-wlm, munge)")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_conf(root: Path) -> str:
    # 4 CPUs whatever the machine has (config_overrides): 2 jobs of 2 one-CPU tasks at once
    return f"""\
ClusterName=bprun-test
SlurmdParameters=config_overrides
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={os.environ.get("USER", "root") if os.geteuid() else "root"}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.sock
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs=4 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _last_error(path: Path) -> str:
    """A daemon's own reason: its last fatal line, else its first error (the cause; slurmd's
    note that it cannot load PMIx, which it does not need here, aside), else its last line."""
    text = path.read_text(errors="replace") if path.is_file() else ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    fatal = [line for line in lines if "fatal" in line.lower()]
    errors = [line for line in lines if "error" in line.lower() and "pmix" not in line.lower()]
    return (fatal[-1:] or errors[:1] or lines[-1:] or [f"no output in {path}"])[0]


@pytest.fixture
def slurm():
    """A one-node SLURM cluster in a temporary folder; yields the environment that points
    sbatch, squeue and scontrol at it. Every job is cancelled and every daemon stopped."""
    if os.name != "posix":
        _unavailable("SLURM runs on Linux only")
    missing = [n for n in (*DAEMONS, *CLIENTS) if not shutil.which(n, path=_sbin_path())]
    if missing:
        _unavailable(f"{', '.join(missing)} not found (apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        _unavailable("slurmd must run as root to start jobs")
    root = Path(tempfile.mkdtemp(prefix="bprun-slurm-"))  # short: the munge socket path
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root))
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": _sbin_path()}
    started: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        log = (root / f"{name}.out").open("w")
        proc = subprocess.Popen(
            [name, *args], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root
        )
        started.append(proc)
        return proc

    try:
        start(
            "munged",
            "--foreground",
            "--force",
            f"--key-file={key}",
            f"--socket={root}/munge.sock",
            f"--pid-file={root}/munged.pid",
            f"--log-file={root}/munged.log",
            f"--seed-file={root}/munged.seed",
        )
        _wait_daemon(lambda: (root / "munge.sock").exists(), started[-1], root / "munged.out")
        start("slurmctld", "-D", "-i", "-f", str(conf))
        start("slurmd", "-D", "-f", str(conf), "-N", "localhost")
        _wait_daemon(lambda: _node_state(env) == "idle", started, root / "slurmd.out", root)
        yield env
    finally:
        if started and started[-1].poll() is None:
            subprocess.run(["scancel", "--user", str(os.geteuid())], env=env, timeout=30)
            _wait(lambda: not _jobs(env), 20)
        for proc in reversed(started):
            proc.send_signal(signal.SIGTERM)
        for proc in reversed(started):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(root, ignore_errors=True)


def _sbin_path() -> str:
    path = os.environ.get("PATH", "")
    extra = [d for d in ("/usr/sbin", "/sbin", "/usr/local/sbin") if d not in path.split(":")]
    return ":".join([path, *extra])


def _node_state(env: dict) -> str:
    r = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True, timeout=10
    )
    return r.stdout.strip()


def _jobs(env: dict) -> list[str]:
    r = subprocess.run(
        ["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True, timeout=10
    )
    return r.stdout.split()


def _wait(predicate, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def _wait_daemon(ready, procs, out: Path, root: Path | None = None, timeout: float = 30) -> None:
    """Wait until `ready()`; skip (fail under CI) with the daemons' own error if one died
    or the node never came up."""
    procs = procs if isinstance(procs, list) else [procs]
    deadline = time.time() + timeout
    while time.time() < deadline:
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            name = Path(dead[0].args[0]).name
            log = out.parent / f"{name}.out"
            _unavailable(f"{name} exited {dead[0].returncode}: {_last_error(log)}")
        try:
            if ready():
                return
        except (subprocess.SubprocessError, OSError):
            pass
        time.sleep(0.2)
    state = ""
    if root is not None:
        r = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%T %E"],
            env={**os.environ, "SLURM_CONF": str(root / "slurm.conf"), "PATH": _sbin_path()},
            capture_output=True,
            text=True,
        )
        state = f" (sinfo: {(r.stdout or r.stderr).strip()})"
    _unavailable(f"not ready in {timeout:.0f} s{state}: {_last_error(out)}")


def _state(job: str, env: dict) -> str:
    r = subprocess.run(
        ["squeue", "-h", "-j", job, "-o", "%T"], env=env, capture_output=True, text=True
    )
    return r.stdout.strip()


@pytest.mark.slow
def test_slurm_sweep_with_a_preempted_job_that_resumes(slurm, tmp_path, data_dir):
    # sbatch refusing the jobs ends in one line with its reason: here the GPU per rank that
    # trainer.device=auto asks for, on a cluster without GPUs
    r = subprocess.run(
        [BPRUN, "-m", "hydra/launcher=submitit_slurm", f"hydra.sweep.dir={tmp_path / 'no'}"]
        + ["seed=1,2"],
        capture_output=True,
        text=True,
        env=slurm,
        timeout=120,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the jobs were not submitted: sbatch: error: "), last
    assert last.endswith("on a cluster without them add trainer.device=cpu"), last

    sweep = tmp_path / "sweep"
    command = [
        BPRUN,
        "-m",
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.cpus_per_task=1",
        f"hydra.sweep.dir={sweep}",
        f"paths.data_dir={data_dir}",
        "trainer.threads=1",
        *[a for a in LONG if not a.startswith("trainer.max_epochs")],
        "trainer.max_epochs=8",  # done in seconds: only the hold keeps it running
        SAME_TWICE,
        "trainer.devices=2",  # 2 SLURM tasks per job, one gloo rank each
        "model._target_=held_model.HeldMLP",  # waits mid-training while `hold` exists
    ]
    hold = tmp_path / "hold"
    hold.touch()
    tests = str(Path(__file__).parent)
    env = {**slurm, "OMP_NUM_THREADS": "1", "PYTHONPATH": tests, "BPRUN_TEST_HOLD": str(hold)}
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        wait_for(lambda: (job_dir(sweep, 0) / "checkpoints" / "last.pt").is_file(), "last.pt", proc)
        job = job_dir(sweep, 0)
        slurm_id = (job / launcher.JOB_ID_FILE).read_text().strip()  # <array>_<task>
        subprocess.run(["scontrol", "requeue", slurm_id], env=env, check=True, timeout=30)
        hold.unlink()  # the job, held mid-training, meets the requeue's SIGTERM now
        # A requeued job waits for its begin time (about two minutes): start it once it
        # is pending again, so that the test does not sit out the wait.
        assert _wait(lambda: _state(slurm_id, env) == "PENDING", 60), _state(slurm_id, env)
        subprocess.run(
            ["scontrol", "update", f"jobid={slurm_id}", "StartTime=now"], env=env, check=True
        )
        out = proc.communicate(timeout=240)[0]
    finally:
        end_session(proc)
    assert proc.returncode == 0, out[-3000:]
    ends_like_the_job_not_stopped(sweep, job, "SIGTERM", epochs=8, out=out)
    # submitit's folder: the job's sbatch script, its pickles and the logs of its tasks
    submitit = sweep / ".submitit" / slurm_id
    assert (submitit / f"{slurm_id}_0_log.out").is_file()
