"""Benchmark tasks in processes of their own, so that each one's peak RSS is its own (see harness.run_child).

``python -m flanops.benchmarks.child`` is a small fork server: it imports torch and transformers
once, says ``ready``, then reads one task (JSON) per line from stdin, forks a fresh process for
it and writes that process's report as one JSON line to stdout. Every task therefore starts
with the libraries loaded and no model in memory, as a new process would, without paying for
the imports again.

Tasks:
  generate   load a model folder (as an endpoint does: any flanops variant, ct2-int8 included) and
             generate one batch of fixed length
  translate  load a CTranslate2 model with a plain ctranslate2.Translator (the CLI peer) and
             generate one batch of fixed length
  train      build a random model of given dims, full or LoRA, and take optimizer steps

Each report holds ``peak_rss_bytes`` (getrusage's ru_maxrss of the task's process) and the RSS
before the model was loaded or built (the interpreter and libraries).
"""
from __future__ import annotations

import json
import os
import sys
import traceback

import torch   # imported once in the server; every forked task inherits it
import transformers.models.t5.modeling_t5  # noqa: F401 - the same

from .forked import in_forked_process
from .rss import current_rss_bytes, peak_rss_bytes

READY = "ready"


def generate(task: dict) -> dict:
    from stepkit.cost import generate_fixed
    from stepkit.modeling import load_model_and_tokenizer

    before = current_rss_bytes()
    model, _ = load_model_and_tokenizer(task["model_dir"])
    inputs = {name: torch.tensor(values) for name, values in task["inputs"].items()}
    with torch.inference_mode():
        generate_fixed(model.eval(), inputs, task["new_tokens"])
    return {"rss_before_load_bytes": before}


def translate(task: dict) -> dict:
    import ctranslate2

    from .peer_runtimes import translate_fixed

    before = current_rss_bytes()
    translator = ctranslate2.Translator(task["model_dir"], device="cpu", intra_threads=task["threads"])
    translate_fixed(translator, task["tokens"], task["new_tokens"])
    return {"rss_before_load_bytes": before}


def train(task: dict) -> dict:
    from stepkit.catalog import T5Dims
    from .lora import TrainingSide

    before = current_rss_bytes()
    batch = {name: torch.tensor(values) for name, values in task["batch"].items()}
    side = TrainingSide.build(task["kind"], T5Dims(**task["dims"]), task, batch)
    for _ in range(task["steps"]):
        side.step()
    return {"rss_before_load_bytes": before, **side.facts()}


TASKS = {"generate": generate, "translate": translate, "train": train}


def run_task(task: dict) -> dict:
    try:
        return {**TASKS[task["task"]](task), "peak_rss_bytes": peak_rss_bytes()}
    except BaseException as err:   # noqa: BLE001 - reported to the parent, which raises it there
        return {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}


def serve() -> int:
    from stepkit.threads import configure_runtime

    configure_runtime()   # threads only: no parallel region runs before the forks
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)   # prints of libraries (peft's parameter line) go to stderr, never into the protocol
    print(READY, file=protocol)
    for line in sys.stdin:
        if not line.strip():
            continue
        task = json.loads(line)
        print(json.dumps(in_forked_process(lambda: run_task(task))), file=protocol)
    return 0


if __name__ == "__main__":
    sys.exit(serve())
