"""The peer runtimes the peers section times flanops' variants against: CTranslate2 int8 converted by its own
CLI and ONNX Runtime int8 (optimum).

The same fp32 model folder goes to each peer the way its own users would take it:
  ctranslate2-cli-int8  ``ct2-transformers-converter --quantization int8``, then a plain
                        ``ctranslate2.Translator(..., intra_threads=1)`` and ``translate_batch``
                        (no flanops code in the timed path)
  onnxruntime-int8      optimum's export (``ORTModelForSeq2SeqLM.from_pretrained(export=True)``),
                        dynamic int8 quantization of each ONNX file (``ORTQuantizer`` with the
                        ``AutoQuantizationConfig`` of this CPU's instruction set), generation
                        through ``ORTModelForSeq2SeqLM.generate`` on 1 intra-op thread (and on 2)
optimum-onnx needs transformers<4.58 while flanops runs transformers 5, so the ONNX Runtime peer
runs in a process of its own (benchmarks/onnx_peer.py) under an overlay of exact pins
(:func:`onnx_overlay`), built once per machine. That process stays up and times a generation
on command, so its rounds interleave with the in-process sides' as the harness requires.

A peer that cannot be made or run here is reported with the error it gave, never left out silently.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

from .harness import BenchSettings, ModelSpec, Progress, Side, Timed, cpu_flags, run_child
from .subjects import Workspace

CT2 = "ctranslate2-cli-int8"
ONNX = "onnxruntime-int8"
FLANOPS_INT8 = "ct2-int8"
WITHIN = 1.1   # the headline: flanops' ct2-int8 within 1.1x of CTranslate2's own int8
ONNX_PEER_SCRIPT = Path(__file__).with_name("onnx_peer.py")
# Exactly what the ONNX Runtime peer runs on; --no-deps, so each pin is checked against its dependants' metadata
ONNX_OVERLAY = (
    "optimum-onnx==0.1.0",           # ORTModelForSeq2SeqLM, ORTQuantizer, the ONNX exporter
    "optimum==2.1.0",                # optimum-onnx 0.1.0: optimum~=2.1.0
    "transformers==4.57.6",          # optimum-onnx 0.1.0: transformers>=4.36,<4.58
    "tokenizers==0.22.2",            # transformers 4.57.6: tokenizers>=0.22,<=0.23.0
    "huggingface_hub==0.36.2",       # transformers 4.57.6: huggingface-hub>=0.34,<1.0
    "onnx==1.23.2",
    "onnxruntime==1.32.0",           # optimum-onnx[onnxruntime]: onnxruntime>=1.18
    "flatbuffers==25.12.19",         # onnxruntime
    "ml_dtypes==0.7.0",              # onnx
)


def onnx_name(threads: int, settings: BenchSettings) -> str:
    """ONNX Runtime's side on ``threads`` intra-op threads (the peers' own count has the plain name)."""
    return ONNX if threads == settings.peer_threads else f"{ONNX}-{threads}-threads"


def onnx_thread_counts(settings: BenchSettings) -> list[int]:
    return list(dict.fromkeys([settings.peer_threads, *settings.thread_counts]))


def peer_models(settings: BenchSettings) -> tuple[ModelSpec, ...]:
    return settings.models[:settings.peer_models] if settings.peer_models is not None else settings.models


# ----------------------------------------------------------------------------- CTranslate2
def translate_fixed(translator, tokens: list[list[str]], new_tokens: int):
    """CTranslate2's own greedy generation of exactly ``new_tokens`` per input (min = max decoding length)."""
    return translator.translate_batch(tokens, beam_size=1, min_decoding_length=new_tokens,
                                      max_decoding_length=new_tokens)


def tokens_of(tokenizer, inputs) -> list[list[str]]:
    """Model inputs (unpadded ids) as the token strings CTranslate2 takes."""
    return [tokenizer.convert_ids_to_tokens(row) for row in inputs["input_ids"].tolist()]


def converter_cli() -> str:
    """The ``ct2-transformers-converter`` installed with ctranslate2 (beside this interpreter, or on PATH)."""
    beside = Path(sys.executable).with_name("ct2-transformers-converter")
    found = str(beside) if beside.is_file() else shutil.which("ct2-transformers-converter")
    if not found:
        raise RuntimeError("ct2-transformers-converter is not installed (it comes with the ctranslate2 package)")
    return found


# ----------------------------------------------------------------------------- ONNX Runtime
def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flanops"


def onnx_overlay(progress: Progress) -> Path:
    """The pinned optimum/ONNX Runtime environment, built once per machine under the user's cache folder.

    Keyed by the pins and the Python/platform (tokenizers and onnxruntime are compiled); built in a
    temporary sibling and renamed, so a concurrent or interrupted build never leaves a half overlay.
    """
    key = hashlib.sha256(json.dumps([ONNX_OVERLAY, sys.version_info[:2], platform.machine()]).encode()).hexdigest()[:16]
    cache = cache_root() / f"onnx-overlay-{key}"
    if (cache / "optimum" / "onnxruntime" / "__init__.py").is_file():
        return cache
    progress(f"installing the ONNX Runtime peer's packages into {cache} (once per machine)")
    cache.parent.mkdir(parents=True, exist_ok=True)
    building = cache.with_name(f".{cache.name}.{uuid.uuid4().hex[:8]}")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-input",
                             "--disable-pip-version-check", "--quiet", "--target", str(building), *ONNX_OVERLAY],
                            capture_output=True, text=True, timeout=900, check=False)
    if result.returncode != 0:
        shutil.rmtree(building, ignore_errors=True)
        raise RuntimeError("pip could not install the ONNX Runtime peer's packages (is the package index reachable?): "
                           + " ".join(result.stderr.strip().splitlines()[-3:]))
    try:
        building.rename(cache)
    except OSError:   # another run finished first: use its overlay
        shutil.rmtree(building, ignore_errors=True)
    return cache


def onnx_instruction_set() -> str:
    """optimum's AutoQuantizationConfig for this CPU: the widest integer instructions it has."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "arm64"
    flags = set(cpu_flags())
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    return "avx512" if "avx512f" in flags else "avx2"


def portable_copy(source: Path, into: Path) -> Path:
    """``source`` as transformers 4.x reads it: configs through stepkit.packaging.portable_config, the rest linked."""
    from stepkit.packaging import portable_config

    into.mkdir(parents=True)
    for path in source.iterdir():
        if path.name in ("config.json", "tokenizer_config.json"):
            (into / path.name).write_bytes(portable_config(path.name, path.read_bytes()))
        elif path.is_file():
            (into / path.name).symlink_to(path.absolute())
    return into


class PeerFailed(RuntimeError):
    """A peer's process answered a command with an error."""


class OnnxRuntimeProcess:
    """benchmarks/onnx_peer.py in an interpreter of its own under the overlay: one JSON line per command and reply."""

    def __init__(self, overlay: Path):
        self.log = tempfile.TemporaryFile(mode="w+", prefix="flanops-bench-onnx-")
        path = os.pathsep.join(p for p in (str(overlay), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_VERBOSITY": "error"}
        self.process = subprocess.Popen([sys.executable, str(ONNX_PEER_SCRIPT)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1, env=env)
        self.versions: dict | None = None

    def send(self, command: dict) -> None:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def reply(self) -> dict:
        if self.versions is None:   # its first line says it has imported its libraries
            self.versions = self.read()["versions"]
        return self.read()

    def call(self, command: dict) -> dict:
        self.send(command)
        return self.reply()

    def read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise PeerFailed(f"the ONNX Runtime process stopped: {self.log_tail()}")
        report = json.loads(line)
        if "error" in report:
            where = " | ".join(report.get("traceback", "").strip().splitlines()[-3:-1])
            raise PeerFailed(f"{report['error']} ({where})" if where else report["error"])
        return report

    def log_tail(self) -> str:
        self.log.seek(0)
        return " | ".join(self.log.read().strip().splitlines()[-6:])

    def close(self) -> None:
        with contextlib.suppress(OSError):   # it may have stopped already
            self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:   # it is ours: end it
            self.process.kill()
            self.process.wait()
        self.log.close()


# ----------------------------------------------------------------------------- one model's peers
class Peers:
    """One model's peers: made from its fp32 folder, measured for memory in fresh processes, then loaded and timed.

    Making starts at once (ONNX Runtime's export runs in its own process meanwhile); :meth:`peak_rss`
    waits for it. A peer that fails at any stage is recorded in ``errors`` with the stage and the
    error, and the comparison goes on without it.
    """

    def __init__(self, spec: ModelSpec, source: Path, settings: BenchSettings, workspace: Workspace,
                 progress: Progress, label: str):
        self.settings, self.progress, self.label = settings, progress, label
        self.errors: dict[str, str] = {}
        self.details: dict[str, dict] = {}
        self.folders: dict[str, Path] = {}
        self.onnx: OnnxRuntimeProcess | None = None
        self.translator = None
        self.attempt(ONNX, "start", lambda: self.start_onnx(source, workspace.folder(spec.name, ONNX)))
        self.attempt(CT2, "conversion", lambda: self.convert_ctranslate2(source, workspace.folder(spec.name, CT2)))

    def attempt(self, peer: str, stage: str, work: Callable[[], Any]) -> Any:
        """``work()``, unless the peer failed before; a failure is recorded and ends the peer."""
        if peer in self.errors:
            return None
        try:
            return work()
        except Exception as err:   # noqa: BLE001 - recorded in the results: the peer's failure is a finding
            self.errors[peer] = f"{stage}: {type(err).__name__}: {err}"
            self.progress(f"{self.label}: {peer} failed ({self.errors[peer][:300]}); going on without it")
            if peer == ONNX:
                self.close_onnx()
            return None

    def start_onnx(self, source: Path, out: Path) -> None:
        instruction_set = onnx_instruction_set()
        overlay = onnx_overlay(self.progress)
        self.progress(f"{self.label}: {ONNX}: optimum's export and int8 quantization ({instruction_set}), "
                      "in its own process meanwhile")
        self.onnx = OnnxRuntimeProcess(overlay)
        self.onnx.send({"op": "export", "source": str(portable_copy(source, out / "source")), "out": str(out),
                        "instruction_set": instruction_set, "per_channel": self.settings.onnx_per_channel})
        self.details[ONNX] = {"made": f"optimum ORTModelForSeq2SeqLM export, ORTQuantizer dynamic int8 "
                                      f"(AutoQuantizationConfig.{instruction_set}, per_channel="
                                      f"{self.settings.onnx_per_channel})", "instruction_set": instruction_set}

    def convert_ctranslate2(self, source: Path, out: Path) -> None:
        import time

        self.progress(f"{self.label}: {CT2}: ct2-transformers-converter --quantization int8")
        command = [converter_cli(), "--model", str(source), "--output_dir", str(out / "model"),
                   "--quantization", "int8"]
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"exit {result.returncode}: {' '.join(result.stderr.strip().splitlines()[-3:])}")
        self.folders[CT2] = out / "model"
        self.details[CT2] = {"made": "ct2-transformers-converter --model FP32 --output_dir OUT --quantization int8",
                             "seconds_to_make": round(time.perf_counter() - started, 1)}

    def wait_made(self) -> None:
        """Block until ONNX Runtime's export and quantization are done (or failed)."""
        if self.onnx is not None and ONNX not in self.folders:
            made = self.attempt(ONNX, "export", self.onnx.reply)
            if made:
                self.folders[ONNX] = Path(made["model_dir"])
                self.details[ONNX].update(files=made["files"], quantization=made["quantization"],
                                          seconds_to_make=round(made["export_seconds"] + made["quantize_seconds"], 1),
                                          versions=self.onnx.versions)

    def weights_bytes(self, peer: str) -> int:
        if peer == ONNX:
            return sum(self.details[ONNX]["files"].values())
        from stepkit.cost import size_on_disk

        return size_on_disk(self.folders[peer])["weights_bytes"]

    def peak_rss(self, tokenizer, batch, new_tokens: int) -> dict[str, dict]:
        """Each peer's peak RSS in a fresh process that loads it and generates ``batch``."""
        self.wait_made()
        threads = self.settings.peer_threads
        reports = {CT2: self.attempt(CT2, "peak RSS", lambda: run_child(
            {"task": "translate", "model_dir": str(self.folders[CT2]), "tokens": tokens_of(tokenizer, batch),
             "new_tokens": new_tokens, "threads": threads}, self.progress, f"{self.label} {CT2}")),
            ONNX: self.attempt(ONNX, "peak RSS", lambda: self.onnx_peak_rss(batch, new_tokens, threads))}
        return {peer: report for peer, report in reports.items() if report}

    def onnx_peak_rss(self, batch, new_tokens: int, threads: int) -> dict:
        self.progress(f"{self.label} {ONNX}: own process for peak memory")
        return self.onnx.call({"op": "peak_rss", "model_dir": str(self.folders[ONNX]), "new_tokens": new_tokens,
                               "threads": threads, "inputs": {k: t.tolist() for k, t in batch.items()}})

    def sides(self, tokenizer, single, batch, new_tokens: int) -> dict[str, Side]:
        """The peers loaded for timing: CTranslate2 here, ONNX Runtime in its process (once per thread count)."""
        self.wait_made()
        sides: dict[str, Side] = {}
        self.attempt(CT2, "load", lambda: sides.update(self.ctranslate2_side(tokenizer, single, batch, new_tokens)))
        self.attempt(ONNX, "load", lambda: sides.update(self.onnx_sides(single, batch, new_tokens)))
        return sides

    def ctranslate2_side(self, tokenizer, single, batch, new_tokens: int) -> dict[str, Side]:
        import ctranslate2

        threads = self.settings.peer_threads
        self.translator = ctranslate2.Translator(str(self.folders[CT2]), device="cpu", intra_threads=threads)
        one, many = tokens_of(tokenizer, single), tokens_of(tokenizer, batch)
        self.details[CT2].update(versions={"ctranslate2": ctranslate2.__version__},
                                 timed=f"Translator(device='cpu', intra_threads={threads}).translate_batch(tokens, "
                                       "beam_size=1, min_decoding_length=n, max_decoding_length=n)")
        return {CT2: Side("ctranslate2", threads, self.weights_bytes(CT2),
                          lambda: translate_fixed(self.translator, one, new_tokens),
                          lambda: translate_fixed(self.translator, many, new_tokens), self.details[CT2])}

    def onnx_sides(self, single, batch, new_tokens: int) -> dict[str, Side]:
        counts = onnx_thread_counts(self.settings)
        self.progress(f"{self.label}: {ONNX}: loading the int8 model on {' and '.join(map(str, counts))} thread(s)")
        inputs = {name: {k: t.tolist() for k, t in tensors.items()} for name, tensors in (("single", single),
                                                                                           ("batch", batch))}
        loaded = self.onnx.call({"op": "load", "model_dir": str(self.folders[ONNX]), "threads": counts,
                                 "new_tokens": new_tokens, "inputs": inputs})
        self.details[ONNX].update(output_shapes=loaded["output_shapes"],
                                  timed="ORTModelForSeq2SeqLM(session_options: intra_op_num_threads=N, "
                                        "inter_op_num_threads=1).generate(**inputs, max_new_tokens=n, "
                                        "min_new_tokens=n, num_beams=1), timed in its process")

        def timed(threads: int, inputs: str) -> Timed:
            return Timed(self.onnx.call({"op": "generate", "threads": threads, "inputs": inputs})["seconds"])

        weights = self.weights_bytes(ONNX)
        return {onnx_name(t, self.settings): Side("onnxruntime", t, weights, lambda t=t: timed(t, "single"),
                                                  lambda t=t: timed(t, "batch"), self.details[ONNX]) for t in counts}

    def close_onnx(self) -> None:
        if self.onnx is not None:
            self.onnx.close()
            self.onnx = None

    def close(self) -> None:
        self.translator = None
        self.close_onnx()
