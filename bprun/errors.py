"""The one exception type for mistakes a user can make and fix.

The command line prints its message as one line (no traceback) and exits
non-zero; everything else is a bug and keeps its traceback.
"""

import os


def debugging() -> bool:
    """The user asked for tracebacks (HYDRA_FULL_ERROR=1 or BPRUN_DEBUG=1)."""
    return any(os.environ.get(v, "") not in ("", "0") for v in ("HYDRA_FULL_ERROR", "BPRUN_DEBUG"))


class BprunError(Exception):
    """A problem with the user's input: the message names it and says what to do."""

    exit_code = 1
    # Raised alike by every rank of a multi-process run (a model the settings do not fit,
    # found once each rank builds it): rank 0 alone prints it, so the mistake is one line.
    every_rank = False


class Interrupted(BprunError):
    """The run stopped on a signal after saving last.pt; exit with 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum

    def __reduce__(self):  # a job's exception travels back to the sweep process pickled
        return (Interrupted, (str(self), self.exit_code - 128))


class SignalExit(KeyboardInterrupt):
    """A stop signal outside the training loop, which handles its own (saving first)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum

    def __str__(self) -> str:
        import signal

        name = signal.Signals(self.signum).name
        return f"stopped by {name} outside the training loop; nothing was left to save"


def fast_exit() -> None:
    """Spare the exiting process the interpreter's last garbage collections.

    Called as a command ends. With torch (and torch._dynamo, which the optimizers load)
    imported, the collections at interpreter shutdown traverse about a million objects
    that are freed on exit anyway: 0.6-0.9 s on a CPU, a share of every command. (A
    finished rank leaves with os._exit instead: see bprun.launch.) Frozen objects are still released and atexit handlers still run (logging
    flushes, TensorBoard closes); only cycles among them are left to the operating system.
    """
    import gc

    gc.freeze()


def stop_on_signals(raising: bool = False) -> None:
    """SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 end the command from now on (the training loop puts its
    own handlers in place while it runs, and these back when it ends). Until `raising` is
    switched on, the command is still importing: nothing to clean up, and an exception
    there would print a traceback, so the handler writes its line and exits at once."""
    import os
    import signal
    import sys

    def _stop(signum, frame):
        if raising:
            raise SignalExit(signum)
        interrupted = SignalExit(signum)
        text = "aborted" if signum == signal.SIGINT else f"error: {interrupted}"
        sys.stderr.write(text + "\n")
        os._exit(interrupted.exit_code)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, _stop)
