"""The two ways a script stops early: one `error: ...` line that names the fix, never a traceback."""

from __future__ import annotations

import gc
import sys
from typing import NoReturn


class ScriptError(Exception):
    """An error a script reports as one line; its `__main__` catches it and calls `exit`."""

    exit_code = 1

    def exit(self) -> NoReturn:
        """Prints `error: <message>` on stderr and ends the process with this error's exit status.

        The frames the error passed through are released first, so that the progress bars they held close before
        the line is printed and it stays the last one.
        """
        error: BaseException | None = self
        while error is not None:  # the error it replaced (`raise ... from None` keeps it as the context) holds frames
            error.__traceback__, error = None, error.__context__
        gc.collect()
        print(f"error: {self}", file=sys.stderr, flush=True)
        sys.exit(self.exit_code)


class UsageError(ScriptError):
    """Bad input (a flag, a file, a model) the user fixes in the command or on disk; exit status 2, as argparse's.

    Raised before anything is written, so the run with the fix finds every file as it was.
    """

    exit_code = 2


class TrainingFault(ScriptError):
    """A fault once the job runs (a non-finite step, out of memory, a failed save or upload); exit status 1.

    The message names the step; checkpoints already complete stay usable.
    """
