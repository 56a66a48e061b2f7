"""One error type for everything a user can get wrong, and one way to report it."""
from __future__ import annotations

import sys
from typing import Callable


class StepError(Exception):
    """A problem the user can fix: the message says what was wrong, where, and what to do."""


def first_line(err: BaseException) -> str:
    """The first line of a library's error message: enough to say what failed, without its traceback."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run_step(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a step's ``main`` and turn a StepError into a one-line message and exit code 2.

    Anything else is a bug in the step and keeps its traceback.
    """
    try:
        return main(argv) or 0
    except StepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output was published", file=sys.stderr)
        return 130
