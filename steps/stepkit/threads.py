"""How many cores a model runs on: all of them for training, one for small models at inference.

Generating with a small model is a long chain of small matrix products: a second intra-op
thread adds a synchronisation per operation that costs more than it saves, and on a busy
machine each one waits for a descheduled thread. Measured on 2 cores: flan-t5-small's
dimensions took 153 ms per summary on 1 thread and 377 ms on 2 (CTranslate2 int8), 785 vs
924 ms (transformers fp32); the 1.6M-parameter stand-in took 85 ms on 1 thread and 478 ms on
2 while other work ran. Above :data:`MULTI_THREAD_PARAMETERS` the products are big enough to
split. ``FLANOPS_THREADS`` overrides the choice (a whole number).
"""
from __future__ import annotations

import os

from .errors import StepError

MULTI_THREAD_PARAMETERS = 400_000_000
THREADS_VARIABLE = "FLANOPS_THREADS"


def usable_cpus() -> int:
    """The cores this job may use: SageMaker's SM_NUM_CPUS, else the affinity mask (cgroup pinning counts)."""
    given = os.environ.get("SM_NUM_CPUS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def threads_override() -> int | None:
    raw = os.environ.get(THREADS_VARIABLE, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise StepError(f"environment variable {THREADS_VARIABLE}={raw!r}: expected a whole number of at least 1")
    return int(raw)


def inference_threads(parameters: int | None, cpus: int | None = None) -> int:
    """Intra-op threads for generating with a model of ``parameters`` (None: unknown, so every core)."""
    override = threads_override()
    if override:
        return override
    if parameters is not None and parameters < MULTI_THREAD_PARAMETERS:
        return 1
    return cpus or usable_cpus()
