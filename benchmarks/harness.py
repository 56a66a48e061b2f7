"""What every benchmark section shares: settings, interleaved timing, statistics, child processes.

Timing rule: the sides of a comparison run in the same process, after warm-up, interleaved
(round r times every side once, in an order rotated by r, so no side always goes first or
last), repeated; each side is reported as its median with the spread (min, quartiles, max)
and the headline is the ratio of medians, with the range of the per-round ratios beside it.

Peak memory (RSS) is measured in a fresh process per variant, forked by a small server that has
only imported the libraries (``flanops.benchmarks.child``): torch allocates outside Python's heap
(tracemalloc cannot see it) and a process's peak only grows, so variants measured in one process
would hide each other. A step script's peak is that of the script run as a user runs it (:func:`run_script`).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from flanops.pipelines.errors import FlanopsError
from stepkit.catalog import T5Dims
from stepkit.cost import percentile

from .rss import maxrss_bytes

Progress = Callable[[str], None]


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class ModelSpec:
    """A model to benchmark: a catalog name and its dims (real dimensions, random weights)."""

    name: str
    dims: T5Dims

    def card(self) -> dict:
        return {"name": self.name, "parameters": self.dims.parameters, "dims": self.dims.as_dict()}


@dataclass(frozen=True)
class BenchSettings:
    mode: str                               # "quick" or "full" (or "custom" in tests)
    models: tuple[ModelSpec, ...]           # quantization, distillation and pruning run on each
    lora_model: ModelSpec                   # LoRA vs full fine-tuning (Flan-T5-base-shaped)
    sections: tuple[str, ...]
    warmup: int = 2                         # untimed runs of every side before the rounds
    repeats: int = 7                        # timed rounds (each side once per round)
    input_tokens: int = 128                 # prompt length at batch 1 and 8, exactly
    new_tokens: int = 32                    # generated per input, exactly (min_new_tokens = max_new_tokens)
    throughput_batch: int = 8
    thread_counts: tuple[int, ...] = (1, 2)  # intra-op threads compared at batch 1 (why stepkit.threads picks 1)
    peer_models: int | None = None          # the peers (CTranslate2's CLI, ONNX Runtime) on the first N (None: all)
    peer_threads: int = 1                   # the peers' intra-op threads (ONNX Runtime is also timed on 2)
    onnx_per_channel: bool = False          # ONNX Runtime int8 weight scales: per channel (optimum's default) or tensor
    prune_amounts: tuple[float, ...] = (0.25, 0.5)   # structured: share of FFN neurons removed per layer
    unstructured_amount: float = 0.5
    unstructured_models: int | None = None  # unstructured (gzip sizes) on the first N models only; None: all
    # configs/cloud.yaml's Flan-T5-base fine-tune, read from it
    lora_r: int = field(default_factory=lambda: cloud_finetune()["lora_r"])
    lora_alpha: int = field(default_factory=lambda: cloud_finetune()["lora_alpha"])
    lora_targets: str = field(default_factory=lambda: cloud_finetune()["target_modules"])
    train_batch: int = 4                    # LoRA vs full: examples per optimizer step
    train_source_tokens: int = 128
    train_target_tokens: int = 32
    finetune_steps: int = 3                 # finetune_lora.py with its defaults on lora_model: optimizer steps
    finetune_validation: int = 64           # its validation examples: enough to fill the largest evaluation batch
    serving_inputs: int = 8                 # distinct dialogues sent per round (endpoint and bare)
    load_clients: tuple[int, ...] = (1, 8, 16)   # concurrent clients per load level; 1 and 8 give the headline
    load_seconds: float = 10.0              # each load level runs this long (then in-flight requests finish)
    load_repeats: int = 3
    executor_train_size: int = 200          # PrepareData's --train-size in the executor benchmark
    memory: bool = True                     # peak RSS in child processes
    seed: int = 0

    def card(self) -> dict:
        values = asdict(self)
        values["models"] = [m.card() for m in self.models]
        values["lora_model"] = self.lora_model.card()
        return values


def cloud_finetune() -> dict[str, Any]:
    """The LoRA settings of configs/cloud.yaml's fine-tune: its parameters, else finetune_lora.py's defaults."""
    from flanops.pipelines.config import load_config
    from flanops.pipelines.step_scripts import import_step

    config = load_config("cloud")
    defaults = import_step("finetune_lora").build_parser()
    return {"lora_r": config.parameters.LoraRank, "lora_alpha": config.parameters.LoraAlpha,
            "target_modules": config.steps.get("finetune", {}).get("target_modules",
                                                                   defaults.get_default("target_modules"))}


# ----------------------------------------------------------------------------- statistics
def quantity(value: float | int | None, unit: str, **extra: Any) -> dict:
    """One figure with its unit."""
    return {"value": value, "unit": unit, **extra}


def spread(samples: list[float], unit: str, digits: int = 3) -> dict:
    """Median and spread of repeated measurements (the samples kept, in the order taken)."""
    return {"median": round(statistics.median(samples), digits), "min": round(min(samples), digits),
            "q1": round(percentile(samples, 25), digits), "q3": round(percentile(samples, 75), digits),
            "max": round(max(samples), digits), "n": len(samples), "unit": unit,
            "samples": [round(s, digits) for s in samples]}


def ratio(numerator: list[float], denominator: list[float], meaning: str) -> dict:
    """Headline ratio of medians; per-round ratios (paired: the same round) give its spread."""
    paired = [a / b for a, b in zip(numerator, denominator) if b]
    return {"value": round(statistics.median(numerator) / statistics.median(denominator), 3), "unit": "x",
            "meaning": meaning,
            "per_round_min": round(min(paired), 3) if paired else None,
            "per_round_max": round(max(paired), 3) if paired else None}


def size_ratio(numerator: int, denominator: int, meaning: str) -> dict:
    return {"value": round(numerator / denominator, 3), "unit": "x", "meaning": meaning}


# ----------------------------------------------------------------------------- interleaving
@dataclass(frozen=True)
class Timed:
    """What a side timed in another process returns: the seconds measured there."""

    seconds: float


@dataclass
class Side:
    """A model as a comparison times it: one generation at batch 1, one at the throughput batch, and what it is."""

    runtime: str                              # what generates: transformers, ctranslate2, onnxruntime
    threads: int                              # intra-op threads it generates with
    weights_bytes: int
    single: Callable[[], Any]
    batch: Callable[[], Any]
    details: dict = field(default_factory=dict)   # how it was made (JSON-ready)


def interleaved(sides: dict[str, Callable[[], Any]], warmup: int, repeats: int, progress: Progress, label: str,
                unit: str = "ms", measure: Callable[[str, float, Any], float] | None = None) -> dict[str, list[float]]:
    """Warm every side up, then ``repeats`` rounds timing each side once (order rotated per round).

    Returns each side's samples: milliseconds by default, or ``measure(side, seconds, result)``
    (e.g. tokens per second) when given. A side that runs in another process returns :class:`Timed`:
    the seconds its own clock took, without the round trip to it.
    """
    children_settled()
    names = list(sides)
    for index in range(warmup):
        for name in names:
            progress(f"{label}: warm-up {index + 1}/{warmup} {name}")
            sides[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            result = sides[name]()
            seconds = result.seconds if isinstance(result, Timed) else time.perf_counter() - started
            samples[name].append(measure(name, seconds, result) if measure else 1000 * seconds)
        progress(f"{label}: round {round_index + 1}/{repeats} " + ", ".join(
            f"{name} {samples[name][-1]:.4g} {unit}" for name in names))
    return samples


# ----------------------------------------------------------------------------- child processes
class ChildServer:
    """``python -m flanops.benchmarks.child``: forks a fresh process per task (see that module)."""

    def __init__(self):
        import subprocess
        import tempfile

        self.log = tempfile.TemporaryFile(mode="w+", prefix="flanops-bench-child-")
        self.process = subprocess.Popen([sys.executable, "-m", "flanops.benchmarks.child"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.ready = False

    def wait_ready(self) -> None:
        if not self.ready:
            line = self.process.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"the benchmark child server did not start: {line or self.log_tail()}")
            self.ready = True

    def run(self, task: dict) -> dict:
        self.wait_ready()
        self.process.stdin.write(json.dumps(task) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the benchmark child server stopped: {self.log_tail()}")
        return json.loads(line)

    def log_tail(self) -> str:
        self.log.seek(0)
        return "\n".join(self.log.read().strip().splitlines()[-8:])

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except Exception:   # noqa: BLE001 - it is ours: end it
            self.process.kill()
            self.process.wait()
        self.log.close()


_children: ChildServer | None = None


def start_children() -> None:
    """Start the child server now (its imports overlap the caller's set-up; timings wait for it)."""
    global _children
    if _children is None:
        _children = ChildServer()


def stop_children() -> None:
    global _children
    if _children is not None:
        _children.close()
        _children = None


def children_settled() -> None:
    """Block until the child server has finished its imports, so that it never competes with a timing."""
    if _children is not None:
        _children.wait_ready()


def run_child(task: dict, progress: Progress, label: str) -> dict:
    """Run one task in a fresh process of its own; returns what it reports."""
    progress(f"{label}: own process for peak memory")
    start_children()
    report = _children.run(task)
    if "error" in report:
        raise RuntimeError(f"{label}: the task's process failed: {report['error']}\n{report.get('traceback', '')}")
    return report


def run_script(script: Path, args: list[str], progress: Progress, label: str) -> dict:
    """Run ``python script args`` as a user does, in a new process, its output lines shown as progress.

    Returns its peak RSS (wait4's rusage: that process alone, from interpreter start to exit) and
    wall seconds; a failure raises with the last lines it printed.
    """
    import collections
    import subprocess

    progress(f"{label}: python {script.name} {' '.join(args)}")
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-u", str(script), *args], cwd=script.parent, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    tail: collections.deque[str] = collections.deque(maxlen=12)
    for line in process.stdout:
        if line.strip():
            tail.append(line.rstrip())
            progress(f"{label}: {line.rstrip()}")
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)   # reaped here: Popen must not wait again
    process.stdout.close()
    if process.returncode != 0:
        raise RuntimeError(f"{label}: {script.name} exited {process.returncode}:\n" + "\n".join(tail))
    return {"peak_rss_bytes": maxrss_bytes(usage.ru_maxrss), "seconds": time.perf_counter() - started}


# ----------------------------------------------------------------------------- the machine
def cpuinfo(key: str) -> str | None:
    """The first ``key`` line of /proc/cpuinfo (None where there is none: not Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> list[str]:
    return (cpuinfo("flags") or "").split()


def machine() -> dict:
    import torch

    from stepkit.threads import usable_cpus

    cpu = cpuinfo("model name") or platform.processor() or platform.machine()
    flags = cpu_flags()
    memory_bytes = None
    try:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    return {"cpu_model": cpu, "cores": os.cpu_count(), "usable_cpus": usable_cpus(),
            "torch_threads": torch.get_num_threads(), "memory_gib": round(memory_bytes / 2**30, 1) if memory_bytes else None,
            "cpu_features": sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512_vnni", "avx2"))),
            "platform": platform.platform(), "hostname": platform.node()}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("flanops", "torch", "transformers", "ctranslate2", "peft", "tokenizers", "safetensors"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def check_out_dir(out: Path) -> Path:
    """Create ``out`` (if needed) and prove it writable, or a FlanopsError naming it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FlanopsError(f"--out {out}: exists and is not a folder; choose a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok", encoding="utf-8")
        probe.unlink()
    except OSError as err:
        raise FlanopsError(f"--out {out}: cannot write there ({err.strerror or err}); choose another folder") from None
    return out


@dataclass
class SectionResult:
    """What a section returns: its figures (JSON-ready) and the targets it measured."""

    figures: dict
    targets: list[dict] = field(default_factory=list)
    charts: list[dict] = field(default_factory=list)   # {"file", "title", "draw": callable(plt) -> figure}
    notes: list[str] = field(default_factory=list)


def target(target_id: str, description: str, measured: float | None, unit: str, threshold: float,
           at_least: bool) -> dict:
    """A target from the issue: what was measured and whether it was met (None: not measured)."""
    met = None if measured is None else (measured >= threshold if at_least else measured <= threshold)
    return {"id": target_id, "description": description, "measured": measured, "unit": unit,
            "threshold": threshold, "comparison": ">=" if at_least else "<=", "met": met}
