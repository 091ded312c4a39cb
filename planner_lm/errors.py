"""User-facing errors: one clear sentence and a non-zero exit, never a bare traceback."""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


class UserError(Exception):
    """A problem the user can fix (bad input, missing upstream stage, mismatched artefacts).

    The message says what is wrong and how to fix it; stage entry points print it without a
    traceback and exit with status 2.
    """


EXIT_USER_ERROR = 2


@contextlib.contextmanager
def friendly_errors() -> Iterator[None]:
    """Turn `UserError` (and Ctrl-C) into a short message and an exit code.

    Set PLANNER_LM_TRACEBACK=1 to see the full traceback while debugging.
    """
    try:
        yield
    except UserError as err:
        if os.environ.get("PLANNER_LM_TRACEBACK"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted: completed work is kept; re-run the same command to resume", file=sys.stderr)
        sys.exit(130)
