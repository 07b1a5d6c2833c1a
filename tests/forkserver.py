"""`bprun` commands for the tests, each in a process forked from one that has imported
bprun, torch, Hydra and torchmetrics once.

A command's imports cost seconds of CPU, and the suite runs hundreds of commands on two
cores. The server (this file, run as a script by `ForkServer`) imports once and, for each
request, forks a child that runs the command as the console script does: `sys.argv`, the
working directory, the environment and `sys.path[0]` set as a fresh `bprun` process would
have them, stdout and stderr into files, its own process group (a timeout kills the
command and any ranks it started). The server is single-threaded and computes nothing, so
the fork copies no half-held lock and no thread pool.

Requests and replies are JSON lines on the server's stdin and stdout. `BPRUN_TEST_FORK=0`
runs every command as a plain subprocess instead.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


class ForkServer:
    """The test process's side: one server per pytest worker, started on first use."""

    def __init__(self, script: str):
        self.script = script
        self.proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        if self.proc is None or self.proc.poll() is not None:
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve())],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
                cwd=HERE,
            )
            ready = self.proc.stdout.readline()
            if ready.strip() != "ready":
                raise RuntimeError(f"the fork server did not start: {ready!r}")
        return self.proc

    def run(self, argv: list[str], cwd: Path, env: dict, timeout: float):
        """(exit code, stdout, stderr) of `bprun <argv>`; TimeoutExpired past `timeout`.
        The output files are the server's, outside the test's folders."""
        folder = Path(tempfile.mkdtemp(prefix="bprun-test-command-"))
        out, err = folder / "stdout.txt", folder / "stderr.txt"
        request = {
            "argv": [self.script, *argv],
            "cwd": str(cwd),
            "env": env,
            "out": str(out),
            "err": str(err),
            "timeout": timeout,
        }
        proc = self._start()
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()
        reply = json.loads(proc.stdout.readline())
        stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
        shutil.rmtree(folder, ignore_errors=True)
        if reply.get("timeout"):
            raise subprocess.TimeoutExpired(argv, timeout, stdout, stderr)
        return reply["code"], stdout, stderr

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)


# ---------------------------------------------------------------------- the server
def prepare() -> None:
    """Import once what every command needs, before the first fork."""
    import importlib

    import torch

    torch.set_num_threads(1)
    from bprun.problems._torchmetrics import load

    load()  # as a command loads it: without scipy.signal
    for name in (
        "bprun.cli",
        "bprun.tasks.train",
        "bprun.tasks.setup",
        "bprun.problems.classification",
        "bprun.problems.regression",
        "bprun.tracking.tensorboard",
        "torch.utils.tensorboard",
        "torchmetrics",
        "torchmetrics.classification",
        "torchmetrics.regression",
        "hydra._internal.utils",
        "omegaconf",
    ):
        importlib.import_module(name)


def _child(request: dict) -> None:
    """The command, as the console script runs it; never returns."""
    code = 70
    try:
        os.setsid()
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
            signal.signal(s, signal.SIG_DFL if s != signal.SIGINT else signal.default_int_handler)
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        err = os.open(request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(null, 0), os.dup2(out, 1), os.dup2(err, 2)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        script = request["argv"][0]
        sys.argv = list(request["argv"])
        sys.path[0] = str(Path(script).parent)  # what a console script's process has there
        from bprun.cli import main

        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, int | None):
                print(e.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            import atexit

            atexit._run_exitfuncs()  # what the interpreter's exit would run: logging, TensorBoard
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def _wait(pid: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {"code": os.waitstatus_to_exitcode(status)}
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return {"code": -9, "timeout": True}
        time.sleep(0.01)


def serve() -> None:
    prepare()
    replies = sys.stdout
    print("ready", file=replies, flush=True)
    while line := sys.stdin.readline():
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(json.dumps(_wait(pid, request["timeout"])), file=replies, flush=True)


if __name__ == "__main__":
    serve()
