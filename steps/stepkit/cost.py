"""What a model costs to keep and to run: size, parameters, FLOPs per token, latency, throughput.

Latency and throughput generate a fixed number of tokens (``min_new_tokens`` =
``max_new_tokens``) from the same inputs for every model, after warm-up runs, so that
models are compared on equal work: a model that stops early is not "faster".
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

    Counted by torch's FlopCounterMode, which knows float matmuls; int8 kernels it does not
    count, so for a quantized model the result is None rather than a misleading low number.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    inputs = encode_prompts(tokenizer, [dialogue], settings.max_source_length)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        generate_fixed(model, inputs, settings.new_tokens)
    total = counter.get_total_flops()
    if total == 0 or _has_quantized_modules(model):
        return None
    return total / settings.new_tokens


def _has_quantized_modules(model) -> bool:
    return any("quantized" in type(module).__module__ for module in model.modules())


def measure_speed(model, tokenizer, dialogues: list[str], settings: CostSettings) -> dict[str, float]:
    """Latency percentiles at batch 1 and generated tokens/s at ``throughput_batch``, after warm-up."""
    import torch

    model.eval()
    singles = [encode_prompts(tokenizer, [d], settings.max_source_length) for d in dialogues[: settings.latency_inputs]]
    batch = encode_prompts(tokenizer, (dialogues * settings.throughput_batch)[: settings.throughput_batch],
                    settings.max_source_length)
    latencies_ms: list[float] = []
    with torch.inference_mode():
        for _ in range(settings.warmup_runs):
            generate_fixed(model, singles[0], settings.new_tokens)
            generate_fixed(model, batch, settings.new_tokens)
        for _ in range(settings.repeats):
            for inputs in singles:
                started = time.perf_counter()
                generate_fixed(model, inputs, settings.new_tokens)
                latencies_ms.append(1000 * (time.perf_counter() - started))
        batch_seconds = []
        for _ in range(settings.repeats):
            started = time.perf_counter()
            generate_fixed(model, batch, settings.new_tokens)
            batch_seconds.append(time.perf_counter() - started)
    generated = settings.throughput_batch * settings.new_tokens
    return {
        "latency_p50_ms": round(percentile(latencies_ms, 50), 3),
        "latency_p95_ms": round(percentile(latencies_ms, 95), 3),
        "throughput_tokens_per_s": round(generated / statistics.median(batch_seconds), 2),
    }


def percentile(values: list[float], percent: float) -> float:
    """Linear-interpolated percentile (numpy's default), without needing numpy here."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * percent / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def settings_dict(settings: CostSettings) -> dict:
    return asdict(settings)
