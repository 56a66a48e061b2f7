"""The embedded AWS server process: moto on a free port of this machine, until SIGTERM.

embedded.py's ``ensure_server`` launches it detached (``python -m flanops.pipelines.embedded_server
serve``) and every flanops process, notebook and AWS CLI call shares it.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from moto.server import ThreadedMotoServer

from . import embedded_api
from .files import write_text_atomic


def serve(host: str, ready_file: Path) -> int:
    """Run moto until SIGTERM or SIGINT. Port 0 lets the OS choose a free port, and the
    server binds it itself, so no other program can take it between choosing and binding.
    The port is reported through ``ready_file``."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    embedded_api.install()   # pipeline executions and endpoint invocations answered from what ran here
    server = ThreadedMotoServer(ip_address=host, port=0, verbose=False)
    server.start()
    port = server.get_host_and_port()[1]
    os.environ["MOTO_PORT"] = str(port)  # moto builds some callback URLs (Lambda) from it

    write_text_atomic(ready_file, f"{port}\n")
    print(f"moto listening on http://{host}:{port} (pid {os.getpid()})", flush=True)

    while not stop.wait(1.0):  # a timeout so that the main thread runs the signal handler promptly
        pass
    print("moto stopping", flush=True)
    server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """The server process that :func:`ensure_server` launches detached; users go through ``flanops local``.

    Its command line keeps the ``serve`` word: embedded.py's ``_is_server_process`` recognises the server by it, also
    one that an earlier flanops started."""
    parser = argparse.ArgumentParser(prog="python -m flanops.pipelines.embedded_server",
                                     description="internal: run the embedded AWS (moto) server in the foreground "
                                                 "(flanops local status|stop|env manage it)", allow_abbrev=False)
    parser.add_argument("command", choices=("serve",))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--ready-file", type=Path, required=True)
    args = parser.parse_args(argv)
    return serve(args.host, args.ready_file)


if __name__ == "__main__":
    sys.exit(main())
