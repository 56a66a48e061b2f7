"""The one error type the CLI turns into ``error: …`` (exit 2) instead of a traceback."""


class FlanopsError(Exception):
    """Something the user can fix, said so: what was wrong, where, and what to do."""
