"""What a model costs to keep and to run: size, parameters, FLOPs per token, latency, throughput.

Latency and throughput generate a fixed number of tokens (``min_new_tokens`` =
``max_new_tokens``) from the same inputs for every model, after warm-up runs, so that
models are compared on equal work: a model that stops early is not "faster". Models are
timed side by side, interleaved (:func:`measure_speed`), so their ratios hold on a busy machine.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .prompt import format_prompt

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


@dataclass
class CostSettings:
    new_tokens: int = 32  # generated per input, fixed for every model
    latency_inputs: int = 8  # distinct inputs timed at batch 1
    repeats: int = 3  # timings per input
    warmup_runs: int = 2
    throughput_batch: int = 8
    max_source_length: int = 512


def size_on_disk(folder: str | Path) -> dict[str, int]:
    """Bytes of the weight files and of the whole folder (tokenizer, config, card included)."""
    files = [p for p in Path(folder).rglob("*") if p.is_file()]
    weights = sum(p.stat().st_size for p in files if p.name.endswith(WEIGHT_SUFFIXES) and "adapter" not in p.parts)
    return {"weights_bytes": weights, "folder_bytes": sum(p.stat().st_size for p in files)}


def encode_prompts(tokenizer, dialogues: list[str], max_source_length: int):
    """The prompts of ``dialogues`` as one padded batch of model inputs, each cut to ``max_source_length`` tokens."""
    return tokenizer([format_prompt(d) for d in dialogues], return_tensors="pt", padding=True, truncation=True,
                     max_length=max_source_length)


def generate_fixed(model, inputs, new_tokens: int):
    """Greedy generation of exactly ``new_tokens`` per input (min = max): equal work for every model."""
    return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=1, do_sample=False)


def flops_per_generated_token(model, tokenizer, dialogue: str, settings: CostSettings) -> float | None:
    """Forward FLOPs of one batch-1 generation (encoder once + decoder per step) / tokens generated.

    Counted by torch's FlopCounterMode, which sees torch's float matmuls only: for a model that
    another runtime runs (CTranslate2) the result is None rather than a misleading zero.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    inputs = encode_prompts(tokenizer, [dialogue], settings.max_source_length)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        generate_fixed(model, inputs, settings.new_tokens)
    total = counter.get_total_flops()
    return total / settings.new_tokens if total else None


def measure_speed(models: dict[str, tuple], dialogues: list[str], settings: CostSettings,
                  reference: str | None = None, log=print) -> dict[str, dict[str, float]]:
    """Latency at batch 1 and tokens/s at ``throughput_batch`` of every model, measured side by side.

    ``models`` maps a name to ``(model, tokenizer)``. Every model first generates once from each
    timed input and from the batch (first-call costs stay out of the figures). Then each round
    times every input on every model in turn, the models in a rotated order, so that a machine
    that gets busier or quieter meanwhile weighs on all of them alike. With ``reference``, each
    model also gets ``latency_ratio``: the median over (round, input) of its time over the
    reference's time on the same input in the same round, a figure load does not move.
    """
    import torch

    names = list(models)
    singles = {name: [encode_prompts(tokenizer, [d], settings.max_source_length)
                      for d in dialogues[: settings.latency_inputs]] for name, (_, tokenizer) in models.items()}
    batches = {name: encode_prompts(tokenizer, (dialogues * settings.throughput_batch)[: settings.throughput_batch],
                                    settings.max_source_length) for name, (_, tokenizer) in models.items()}
    times = {name: [[0.0] * len(singles[name]) for _ in range(settings.repeats)] for name in names}
    batch_seconds: dict[str, list[float]] = {name: [] for name in names}

    def timed(name: str, inputs) -> float:
        started = time.perf_counter()
        generate_fixed(models[name][0], inputs, settings.new_tokens)
        return time.perf_counter() - started

    with torch.inference_mode():
        for name in names:
            models[name][0].eval()
            for _ in range(settings.warmup_runs):
                for inputs in singles[name]:
                    generate_fixed(models[name][0], inputs, settings.new_tokens)
                generate_fixed(models[name][0], batches[name], settings.new_tokens)
        for round_index in range(settings.repeats):
            order = names[round_index % len(names):] + names[:round_index % len(names)]
            for input_index in range(len(singles[names[0]])):
                for name in order:
                    times[name][round_index][input_index] = 1000 * timed(name, singles[name][input_index])
            for name in order:
                batch_seconds[name].append(timed(name, batches[name]))
            log(f"timing round {round_index + 1}/{settings.repeats}: {len(names)} models x "
                f"{len(singles[names[0]])} inputs at batch 1 and a batch of {settings.throughput_batch}")
    generated = settings.throughput_batch * settings.new_tokens
    speed = {}
    for name in names:
        latencies_ms = [value for row in times[name] for value in row]
        speed[name] = {"latency_p50_ms": round(percentile(latencies_ms, 50), 3),
                       "latency_p95_ms": round(percentile(latencies_ms, 95), 3),
                       "throughput_tokens_per_s": round(generated / statistics.median(batch_seconds[name]), 2)}
        if reference is not None:
            ratios = [mine / theirs for mine_row, their_row in zip(times[name], times[reference])
                      for mine, theirs in zip(mine_row, their_row)]
            speed[name]["latency_ratio"] = round(statistics.median(ratios), 4)
    return speed


def percentile(values: list[float], percent: float) -> float:
    """Linear-interpolated percentile (numpy's default), without needing numpy here."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * percent / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def settings_dict(settings: CostSettings) -> dict:
    return asdict(settings)
