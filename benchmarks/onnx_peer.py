"""The ONNX Runtime int8 peer's own process: optimum exports, quantizes and times a model on command.

optimum-onnx needs transformers<4.58 and flanops runs transformers 5, so this file runs as a
plain script (it imports nothing of flanops) in an interpreter whose PYTHONPATH starts with the
overlay of exact pins that ``peers.onnx_overlay`` builds; torch, numpy etc. come from the venv.
One process per model. It says ``{"ready": ...}`` once its imports are done, then reads one
command (JSON) per line from stdin and answers each with one JSON line on stdout:

  export     optimum's export of a Hugging Face folder (ORTModelForSeq2SeqLM, export=True) and
             dynamic int8 quantization of each ONNX file (ORTQuantizer), in a forked process
  peak_rss   a forked process loads the int8 model, generates one batch, reports its peak RSS
  load       load the int8 model once per intra-op thread count, for timing
  generate   one fixed-length greedy generation; answers the seconds it took, timed here

Forks happen before any model is loaded in this process (``load`` comes last), so each forked
task starts with the libraries imported and no model in memory, as benchmarks.child's do.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import onnxruntime
import torch
from optimum.onnxruntime import ORTModelForSeq2SeqLM, ORTQuantizer
from optimum.onnxruntime.configuration import AutoQuantizationConfig
from optimum.onnxruntime.constants import ONNX_DECODER_NAME, ONNX_DECODER_WITH_PAST_NAME, ONNX_ENCODER_NAME
from forked import in_forked_process  # benchmarks/forked.py and rss.py, beside this script (standard library only)
from rss import current_rss_bytes, peak_rss_bytes

CPU = "CPUExecutionProvider"
EXPORTED = "onnx"       # optimum's float32 export (removed once quantized)
QUANTIZED = "int8"      # what is timed: the quantized ONNX files and the configs
PR_SET_PDEATHSIG = 1   # prctl option: a signal for this process when its parent ends
VERSIONS = ("transformers", "optimum", "optimum-onnx", "onnxruntime", "onnx", "torch")


def onnx_files(folder: Path) -> dict[str, int]:
    """The model's weight files (ONNX graphs with their initializers, and any external data): name → bytes."""
    return {path.name: path.stat().st_size for path in sorted(folder.iterdir())
            if path.suffix in (".onnx", ".onnx_data") or path.name.endswith(".onnx.data")}


def export(command: dict) -> dict:
    source, out = Path(command["source"]), Path(command["out"])
    started = time.perf_counter()
    model = ORTModelForSeq2SeqLM.from_pretrained(source, export=True, provider=CPU)
    model.save_pretrained(out / EXPORTED)
    exported = time.perf_counter()
    config = getattr(AutoQuantizationConfig, command["instruction_set"])(is_static=False,
                                                                       per_channel=command["per_channel"])
    for name in onnx_files(out / EXPORTED):
        if name.endswith(".onnx"):
            ORTQuantizer.from_pretrained(out / EXPORTED, file_name=name).quantize(save_dir=out / QUANTIZED,
                                                                                  quantization_config=config)
    generation = out / EXPORTED / "generation_config.json"   # the export's generation defaults (start, eos, pad)
    if generation.is_file():
        shutil.copyfile(generation, out / QUANTIZED / generation.name)
    shutil.rmtree(out / EXPORTED)
    return {"export_seconds": round(exported - started, 1),
            "quantize_seconds": round(time.perf_counter() - exported, 1), "files": onnx_files(out / QUANTIZED),
            "model_dir": str(out / QUANTIZED),
            "quantization": {"format": config.format.name, "mode": config.mode.name, "per_channel": config.per_channel,
                             "reduce_range": config.reduce_range, "weights": config.weights_dtype.name,
                             "activations": config.activations_dtype.name,
                             "operators": list(config.operators_to_quantize)}}


def quantized_name(name: str) -> str:
    """ORTQuantizer's name for the quantized ``name``: encoder_model.onnx → encoder_model_quantized.onnx."""
    return name.replace(".onnx", "_quantized.onnx")


def load(model_dir: str, threads: int):
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ORTModelForSeq2SeqLM.from_pretrained(
        model_dir, session_options=options, provider=CPU, use_merged=False,
        encoder_file_name=quantized_name(ONNX_ENCODER_NAME), decoder_file_name=quantized_name(ONNX_DECODER_NAME),
        decoder_with_past_file_name=quantized_name(ONNX_DECODER_WITH_PAST_NAME))


def generate(model, inputs: dict, new_tokens: int):
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=1,
                              do_sample=False)


def tensors(inputs: dict) -> dict:
    return {name: torch.tensor(values) for name, values in inputs.items()}


def peak_rss(command: dict) -> dict:
    before = current_rss_bytes()
    torch.set_num_threads(command["threads"])
    generate(load(command["model_dir"], command["threads"]), tensors(command["inputs"]), command["new_tokens"])
    return {"rss_before_load_bytes": before, "peak_rss_bytes": peak_rss_bytes()}


FORKED = {"export": export, "peak_rss": peak_rss}


def die_with_parent() -> None:
    """Linux: end this forked process when the peer process ends (a run stopped early leaves no export behind)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):   # not Linux: it ends when it has written its report
        pass


def answer(task, command: dict) -> dict:
    try:
        return task(command)
    except BaseException as err:   # noqa: BLE001 - reported to the parent, which records it
        return {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}


class Timer:
    """The models loaded for timing (one per thread count) and the inputs they generate from."""

    def __init__(self):
        self.models: dict[int, object] = {}
        self.inputs: dict[str, dict] = {}
        self.new_tokens = 0

    def load(self, command: dict) -> dict:
        self.inputs = {name: tensors(values) for name, values in command["inputs"].items()}
        self.new_tokens = command["new_tokens"]
        shapes = {}
        for threads in command["threads"]:
            self.models[threads] = load(command["model_dir"], threads)
            shapes[threads] = list(generate(self.models[threads], self.inputs["single"], self.new_tokens).shape)
        return {"output_shapes": shapes}

    def generate(self, command: dict) -> dict:
        threads = command["threads"]
        torch.set_num_threads(threads)   # transformers' generate loop runs its own small torch ops
        started = time.perf_counter()
        output = generate(self.models[threads], self.inputs[command["inputs"]], self.new_tokens)
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "shape": list(output.shape)}


def serve() -> int:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)   # the libraries' prints and warnings go to stderr, never into the protocol
    print(json.dumps({"ready": True, "versions": {name: package_version(name) for name in VERSIONS}}), file=protocol)
    timer = Timer()
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        op = command["op"]
        if op in FORKED:
            if timer.models:
                report = {"error": f"bug: {op} after load (a fork would inherit the loaded models)"}
            else:
                report = in_forked_process(lambda: answer(FORKED[op], command), in_child=die_with_parent)
        else:
            report = answer(getattr(timer, op), command)
        print(json.dumps(report), file=protocol)
    return 0


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(serve())
