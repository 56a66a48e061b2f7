"""One error type for everything a user can get wrong, and one way to report it."""
from __future__ import annotations

import errno
import sys
from typing import Callable

from .quiet import quiet_known_noise

# What a full or read-only disk looks like from Python, and from libraries that format the OS error.
_STORAGE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                   errno.EROFS: "the file system is read-only", errno.EFBIG: "the file is too large for the file system"}
_STORAGE_TEXTS = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
                  "Read-only file system": errno.EROFS}


class StepError(Exception):
    """A problem the user can fix: the message says what was wrong, where, and what to do."""


def first_line(err: BaseException) -> str:
    """The first line of a library's error message: enough to say what failed, without its traceback."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def storage_problem(err: BaseException) -> str | None:
    """"no space left on the device" and the like when ``err`` is a full or read-only disk, else None.

    safetensors and torch wrap the OS error in their own types, so their message is read too.
    """
    code = err.errno if isinstance(err, OSError) else None
    if code is None:
        code = next((number for text, number in _STORAGE_TEXTS.items() if text in str(err)), None)
    return _STORAGE_ERRNOS.get(code)


def run_step(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a step's ``main`` and turn a StepError into a one-line message and exit code 2.

    Anything else is a bug in the step and keeps its traceback. Library messages known to be harmless
    are hidden first (``stepkit.quiet``; ``FLANOPS_VERBOSE=1`` shows them).
    """
    quiet_known_noise()
    try:
        return main(argv) or 0
    except StepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output was published", file=sys.stderr)
        return 130
