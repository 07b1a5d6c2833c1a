"""The one exception type for mistakes a user can make and fix.

The command line prints its message as one line (no traceback) and exits
non-zero; everything else is a bug and keeps its traceback.
"""


class BprunError(Exception):
    """A problem with the user's input: the message names it and says what to do."""

    exit_code = 1


class Interrupted(BprunError):
    """The run stopped on a signal after saving last.pt; exit with 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
