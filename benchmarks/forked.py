"""A task in a forked process of its own: its memory (its peak RSS) and any crash stay its own.

Standard library only: benchmarks/onnx_peer.py runs as a plain script under another transformers
and imports this file by its bare name (its folder is the script's sys.path[0]); benchmarks.child
imports it as ``flanops.benchmarks.forked``.
"""
from __future__ import annotations

import json
import os
from typing import Callable


def in_forked_process(task: Callable[[], dict], in_child: Callable[[], None] = lambda: None) -> dict:
    """``task()``'s report (JSON-able), computed in a forked process that first calls ``in_child``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        in_child()
        with os.fdopen(write_end, "w") as out:
            out.write(json.dumps(task()))
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as inp:
        report = inp.read()
    _, status = os.waitpid(pid, 0)
    if not report:
        return {"error": f"the forked process ended without a report (wait status {status})"}
    return json.loads(report)
