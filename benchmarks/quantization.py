"""Quantization: fp32 vs bf16 vs ct2-int8 on each model (real dimensions, random weights); and threads.

Each variant is made by steps/quantize.py itself (Workspace.variant), loaded back through
stepkit.modeling.load_model_and_tokenizer as an endpoint loads it, and timed side by side on the
intra-op threads stepkit.threads gives the model's size. Figures: weight-file bytes, generation
latency at batch 1, generated tokens/s at batch 8, and the peak RSS of a fresh process that loads
the variant and generates one batch. When the peers section runs too, its peers are timed in the
same rounds: :func:`compare` measures each model once per run and both sections report from it.

Threads: batch-1 latency of fp32 (torch.set_num_threads) and ct2-int8 (CTranslate2's
intra_threads) on each of ``thread_counts`` threads, interleaved: the evidence for
stepkit.threads' choice of one thread below its parameter threshold.
"""
from __future__ import annotations

import gc
import statistics

from stepkit.cost import generate_fixed, size_on_disk
from stepkit.modeling import load_model_and_tokenizer
from .harness import (BenchSettings, ModelSpec, Progress, SectionResult, Side, interleaved, quantity, ratio, run_child,
                      size_ratio, spread, target)
from .peer_runtimes import Peers, peer_models, tokens_of, translate_fixed
from .subjects import Workspace, fixed_inputs

TITLE = "Quantization"
VARIANTS = ("fp32", "bf16", "ct2-int8")   # quantize.py's methods (fp32: the model it starts from)
BASELINE = "fp32"
INT8 = "ct2-int8"
SIZE_TARGET = 3.5   # the issue's: ct2-int8 weights at least 3.5x smaller than fp32


def compare(spec: ModelSpec, settings: BenchSettings, workspace: Workspace, progress: Progress) -> dict:
    """``spec``'s sides timed side by side, once per run: flanops' variants, and the peers if that section runs."""
    with_peers = "peers" in settings.sections and spec in peer_models(settings)
    return workspace.once(("compare", spec.name), lambda: measure(spec, settings, workspace, progress, with_peers))


def measure(spec: ModelSpec, settings: BenchSettings, workspace: Workspace, progress: Progress,
            with_peers: bool) -> dict:
    """Make every side, measure each one's peak RSS in a fresh process, then load them all and time them interleaved."""
    import torch

    from stepkit.threads import inference_threads

    label = f"quantization {spec.name}"
    source = workspace.fp32(spec, settings.seed)
    tokenizer, n = workspace.tokenizer, settings.new_tokens
    single = fixed_inputs(tokenizer, settings.input_tokens, 1)
    batch = fixed_inputs(tokenizer, settings.input_tokens, settings.throughput_batch)
    peers = Peers(spec, source, settings, workspace, progress, label) if with_peers else None
    threads = inference_threads(spec.dims.parameters)
    previous = torch.get_num_threads()   # before any Translator: making one sets this thread's OpenMP count
    try:
        folders = {BASELINE: source}
        for variant in VARIANTS[1:]:
            progress(f"{label}: making {variant} with steps/quantize.py")
            folders[variant] = workspace.variant(spec, variant, settings.seed)
        memory = {}
        if settings.memory:
            for variant, folder in folders.items():
                memory[variant] = run_child({"task": "generate", "model_dir": str(folder), "new_tokens": n,
                                             "inputs": {k: t.tolist() for k, t in batch.items()}},
                                            progress, f"{label} {variant}")
            if peers:
                memory.update(peers.peak_rss(tokenizer, batch, n))
        sides = {}
        for variant, folder in folders.items():
            model = load_model_and_tokenizer(folder)[0].eval()
            sides[variant] = Side(getattr(model, "runtime", "transformers"), getattr(model, "threads", threads),
                                  size_on_disk(folder)["weights_bytes"], lambda m=model: generate_fixed(m, single, n),
                                  lambda m=model: generate_fixed(m, batch, n),
                                  {"made": "the fp32 model (save_pretrained)" if variant == BASELINE else
                                   f"steps/quantize.py --method {variant}",
                                   "timed": "stepkit.cost.generate_fixed on load_model_and_tokenizer's model"})
        if peers:
            sides.update(peers.sides(tokenizer, single, batch, n))
        torch.set_num_threads(threads)   # the torch variants run as stepkit.threads has them run
        with torch.inference_mode():
            latency = interleaved({name: side.single for name, side in sides.items()}, settings.warmup,
                                  settings.repeats, progress, f"{label} batch 1")
            generated = settings.throughput_batch * n
            throughput = interleaved({name: side.batch for name, side in sides.items()}, settings.warmup,
                                     settings.repeats, progress, f"{label} batch {settings.throughput_batch}",
                                     unit="tokens/s", measure=lambda _name, seconds, _result: generated / seconds)
    finally:
        torch.set_num_threads(previous)
        if peers:
            peers.close()
    figures = {}
    for name, side in sides.items():
        figures[name] = {"runtime": side.runtime, "threads": side.threads,
                         "weights_bytes": quantity(side.weights_bytes, "bytes"),
                         "latency_batch1": spread(latency[name], "ms"),
                         "throughput": spread(throughput[name], "tokens/s"),
                         "details": side.details}
        if name in memory:
            figures[name]["peak_rss"] = quantity(memory[name]["peak_rss_bytes"], "bytes",
                                                 measured=f"fresh process: load, then generate at batch "
                                                          f"{settings.throughput_batch}",
                                                 rss_before_load_bytes=memory[name]["rss_before_load_bytes"])
    sides.clear()
    gc.collect()   # the loaded models go before the next model's are made
    return {"model": spec.card(), "sides": figures, "peer_errors": dict(peers.errors) if peers else {}}


def thread_choice(spec: ModelSpec, settings: BenchSettings, workspace: Workspace, progress: Progress) -> dict:
    """Batch-1 latency of fp32 (torch) and ct2-int8 (CTranslate2) on each of ``thread_counts`` intra-op threads."""
    import ctranslate2
    import torch

    from stepkit.ctranslate import RUNTIME_DIR
    from stepkit.threads import MULTI_THREAD_PARAMETERS, inference_threads, usable_cpus

    counts, n = settings.thread_counts, settings.new_tokens
    previous = torch.get_num_threads()   # before the Translators: making one sets this thread's OpenMP count
    fp32 = load_model_and_tokenizer(workspace.fp32(spec, settings.seed))[0].eval()
    single = fixed_inputs(workspace.tokenizer, settings.input_tokens, 1)
    tokens = tokens_of(workspace.tokenizer, single)
    int8 = str(workspace.variant(spec, INT8, settings.seed) / RUNTIME_DIR)
    translators = {t: ctranslate2.Translator(int8, device="cpu", intra_threads=t) for t in counts}

    def on_torch(threads: int):
        torch.set_num_threads(threads)
        return generate_fixed(fp32, single, n)

    def side(variant: str, threads: int) -> str:
        return f"{variant} on {threads}"

    sides = {**{side(BASELINE, t): (lambda t=t: on_torch(t)) for t in counts},
             **{side(INT8, t): (lambda t=t: translate_fixed(translators[t], tokens, n)) for t in counts}}
    try:
        with torch.inference_mode():
            latency = interleaved(sides, settings.warmup, settings.repeats, progress, f"threads {spec.name} batch 1")
    finally:
        torch.set_num_threads(previous)
    del fp32, translators, sides
    gc.collect()
    figures = {"stepkit_threads": inference_threads(spec.dims.parameters), "usable_cpus": usable_cpus(),
               "multi_thread_parameters": MULTI_THREAD_PARAMETERS, "runtimes": {}}
    for variant, runtime in ((BASELINE, "torch (transformers generate)"), (INT8, "CTranslate2 translate_batch")):
        samples = {t: latency[side(variant, t)] for t in counts}
        figures["runtimes"][variant] = {
            "runtime": runtime,
            "latency_batch1": {str(t): spread(samples[t], "ms") for t in counts},
            "more_threads_slower": {str(t): ratio(samples[t], samples[counts[0]],
                                                  f"{variant} latency on {t} threads / on {counts[0]}")
                                    for t in counts[1:]},
            "fastest": min(counts, key=lambda t: statistics.median(samples[t]))}
    return figures


def run(settings: BenchSettings, workspace: Workspace, progress: Progress) -> SectionResult:
    runs, targets = [], []
    for spec in settings.models:
        measured = compare(spec, settings, workspace, progress)
        variants = {variant: measured["sides"][variant] for variant in VARIANTS}
        base = variants[BASELINE]
        ratios = {}
        for variant in VARIANTS[1:]:
            v = variants[variant]
            ratios[variant] = {
                "size_smaller": size_ratio(base["weights_bytes"]["value"], v["weights_bytes"]["value"],
                                           f"fp32 weight bytes / {variant} weight bytes"),
                "latency_faster": ratio(base["latency_batch1"]["samples"], v["latency_batch1"]["samples"],
                                        f"fp32 latency / {variant} latency, batch 1"),
                "throughput_gain": ratio(v["throughput"]["samples"], base["throughput"]["samples"],
                                         f"{variant} tokens/s / fp32 tokens/s, batch {settings.throughput_batch}"),
            }
            if "peak_rss" in base and "peak_rss" in v:
                ratios[variant]["peak_rss_smaller"] = size_ratio(base["peak_rss"]["value"], v["peak_rss"]["value"],
                                                                 f"fp32 peak RSS / {variant} peak RSS")
        threads = thread_choice(spec, settings, workspace, progress)
        runs.append({"model": spec.card(), "variants": variants, "ratios": ratios, "threads": threads})
        targets.append(target(f"quantization.ct2_int8_size.{spec.name}",
                              f"{spec.name}: ct2-int8 weights at least {SIZE_TARGET:g}x smaller than fp32",
                              ratios[INT8]["size_smaller"]["value"], "x", SIZE_TARGET, at_least=True))
    return SectionResult(
        figures={"runs": runs, "baseline": BASELINE, "variants": list(VARIANTS),
                 "thread_counts": list(settings.thread_counts)},
        targets=targets,
        notes=["ct2-int8 is CTranslate2 with int8 weights in every Linear layer, the embeddings and the LM head "
               "(steps/quantize.py); bf16 casts every weight. The weight bytes count every weight file "
               "(ct2-int8: ctranslate2/model.bin).",
               "Each variant generates on the intra-op threads stepkit.threads gives its size (the threads column); "
               "the threads table times fp32 and ct2-int8 on each thread count side by side.",
               "How the same ct2-int8 compares with CTranslate2's and ONNX Runtime's own int8: the peers section."])
