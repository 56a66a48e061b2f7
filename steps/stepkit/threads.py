"""How many cores a model runs on: the idle ones for training, one for small models at inference.

Generating with a small model is a long chain of small matrix products: a second intra-op
thread adds a synchronisation per operation that costs more than it saves, and on a busy
machine each one waits for a descheduled thread. Measured on 2 cores: flan-t5-small's
dimensions took 153 ms per summary on 1 thread and 377 ms on 2 (CTranslate2 int8), 785 vs
924 ms (transformers fp32); the 1.6M-parameter stand-in took 85 ms on 1 thread and 478 ms on
2 while other work ran. Above :data:`MULTI_THREAD_PARAMETERS` the products are big enough to
split. Training splits bigger products, but a thread on a core that other work keeps busy
stalls every step (measured: a training step of the stand-in took 1.0-1.5 s on 1 thread and
7-8.5 s on 2 while other processes ran), so training takes the cores that are idle when it
starts (:func:`idle_cpus`). ``FLANOPS_THREADS`` overrides the choice (a whole number).
"""
from __future__ import annotations

import os
import time

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


def idle_cpus(window_s: float = 0.3) -> int:
    """The usable cores that other work leaves idle, from /proc/stat over ``window_s`` (at least 1).

    Where /proc/stat cannot be read (not Linux), every usable core counts as idle.
    """
    usable = usable_cpus()
    try:
        before = cpu_times()
        time.sleep(window_s)
        after = cpu_times()
    except (OSError, ValueError, IndexError):
        return usable
    return idle_cores(before, after, os.cpu_count() or usable, usable)


def cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies of all cores from /proc/stat's first line; idle includes iowait."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields[:8])   # guest time is in user already


def idle_cores(before: tuple[int, int], after: tuple[int, int], cores: int, usable: int) -> int:
    """How many of ``usable`` cores were idle between two :func:`cpu_times` samples, rounded, at least 1."""
    total = after[1] - before[1]
    if total <= 0:
        return usable
    return max(1, min(usable, round((after[0] - before[0]) / total * cores)))


def training_threads() -> int:
    """Intra-op threads for training: the override, else the idle usable cores."""
    return threads_override() or idle_cpus()


class ThreadsThatFit:
    """Re-decides training's intra-op threads while it runs: the cores that other processes leave free.

    Training threads are chosen when a job starts, but other work may start later, and a thread on a
    core that another process keeps busy stalls every step (a tiny model's training ran 3x slower on
    2 threads than on 1 once another process took a core). :meth:`check` compares /proc/stat with
    this process's own CPU time since the last check; call it every few seconds.
    """

    def __init__(self, usable: int | None = None):
        self.usable = usable or usable_cpus()
        self.last = self._sample()

    @staticmethod
    def _sample() -> tuple[int, int, int] | None:
        try:
            idle, total = cpu_times()
            with open("/proc/self/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            return idle, total, int(fields[11]) + int(fields[12])   # utime + stime, in the same clock ticks
        except (OSError, ValueError, IndexError):
            return None

    def check(self) -> int | None:
        """The thread count that fits now, or None when it cannot be told (not Linux, no time passed)."""
        now = self._sample()
        if now is None or self.last is None:
            return None
        before, self.last = self.last, now
        return free_cores(before, now, os.cpu_count() or self.usable, self.usable)


def free_cores(before: tuple[int, int, int], after: tuple[int, int, int], cores: int, usable: int) -> int | None:
    """Usable cores that processes other than this one left free between two samples (idle, total, own ticks)."""
    total = after[1] - before[1]
    if total <= 0:
        return None
    busy = total - (after[0] - before[0])
    others = max(0, busy - (after[2] - before[2])) / (total / cores)   # in cores
    return max(1, min(usable, int(usable - others + 0.3)))   # a core only a third busy still counts as free


def configure_runtime(parameters: int | None = None) -> int:
    """torch's intra-op threads: the idle cores we were given for training (``parameters`` None), or as many
    as ``threads.inference_threads`` gives a model of that size for generating; plain log lines. Returns the count.

    transformers 5 draws a progress bar per file loaded or saved; in job logs that is noise.
    """
    import torch
    from transformers.utils import logging as transformers_logging

    threads = inference_threads(parameters) if parameters is not None else training_threads()
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)   # else accelerate resets torch to every core under torchrun
    transformers_logging.disable_progress_bar()
    return threads
