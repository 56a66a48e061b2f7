"""This process's resident memory (RSS), now and at its peak.

Standard library only: benchmarks/onnx_peer.py runs as a plain script under another transformers
and imports this file by its bare name (its folder is the script's sys.path[0]); everything else
imports it as ``flanops.benchmarks.rss``.
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path


def current_rss_bytes() -> int:
    """Resident memory now (Linux /proc), else the peak so far."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    return maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def maxrss_bytes(maxrss: int) -> int:
    """getrusage's ``ru_maxrss`` in bytes."""
    return maxrss if sys.platform == "darwin" else maxrss * 1024   # bytes on macOS, KiB on Linux
