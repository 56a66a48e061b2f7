"""The flanops home (records, caches, the embedded server's files) and the processes flanops starts."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


def flanops_home() -> Path:
    """``$FLANOPS_HOME`` if set, else ``~/.flanops``; absolute, so that it holds in the server's own cwd."""
    configured = os.environ.get("FLANOPS_HOME")
    home = Path(configured) if configured else Path("~/.flanops")
    return home.expanduser().absolute()


def embedded_dir() -> Path:
    return flanops_home() / "embedded"


def log_file() -> Path:
    return embedded_dir() / "server.log"


def process_alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child that exited: reap it, it is gone
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, so not ours; _is_server_process says so
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """An exited process that its parent has not reaped yet. A server started by another, already
    finished flanops process goes to init, which in a container may reap it late or never."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # no /proc (macOS), or it has just been reaped
    return stat.rpartition(")")[2].split()[:1] == ["Z"]  # state follows the command name, which may hold spaces
