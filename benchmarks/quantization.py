"""Quantization: fp32 vs bf16 vs int8-dynamic vs int8-static on each model (real dimensions, random weights).

Each variant is made with stepkit.quantization (as steps/quantize.py makes it), written to disk
and loaded back through stepkit.modeling.load_model_and_tokenizer, as an endpoint loads it; the
loaded models are then timed side by side. Figures: weight-file bytes, generation latency at
batch 1, generated tokens/s at batch 8, and the peak RSS of a fresh process that loads the
variant and generates one batch.
"""
from __future__ import annotations

import copy
import gc
import shutil

from ..steps.stepkit.cost import generate_fixed, size_on_disk
from ..steps.stepkit.modeling import load_model_and_tokenizer, write_model_card
from .harness import BenchSettings, Progress, SectionResult, interleaved, quantity, ratio, run_child, size_ratio, spread, target
from .subjects import Workspace, dialogues, fixed_inputs

TITLE = "Quantization"
VARIANTS = ("fp32", "bf16", "int8-dynamic", "int8-static")
BASELINE = "fp32"


def calibration_batches(tokenizer, settings: BenchSettings) -> list[dict]:
    """Teacher-forced examples of one (no padding to observe), as steps/quantize.py calibrates."""
    import torch

    from ..steps.stepkit.training import encode_records

    rows = dialogues(settings.calibration_examples, seed=settings.seed + 1)
    encoded = encode_records(tokenizer, rows, settings.input_tokens, max_target_length=128)
    return [{name: torch.tensor([feature[name]]) for name in ("input_ids", "attention_mask", "labels")}
            for feature in encoded.features]


def make_variant(model, variant: str, source, workspace: Workspace, spec, settings: BenchSettings):
    """Write ``variant`` of the fp32 ``model`` (a copy is changed) to its own folder; returns the folder."""
    from ..steps.stepkit import quantization

    card = {"method": "quantize", "quantization": {"method": variant}}
    work = copy.deepcopy(model)
    if variant in quantization.HALF_METHODS:
        return workspace.save(work.to(quantization.HALF_METHODS[variant]), spec, variant, card)
    if variant == "int8-dynamic":
        quantization.quantize_dynamic(work)
    else:
        quantization.quantize_static(work, calibration_batches(workspace.tokenizer, settings))
    folder = workspace.folder(spec.name, variant)
    quantization.save_int8(work, folder, variant)
    for name in quantization.COPIED_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
    workspace.tokenizer.save_pretrained(folder)
    write_model_card(folder, {"base_model": spec.name, **card})
    return folder


def run(settings: BenchSettings, workspace: Workspace, progress: Progress) -> SectionResult:
    import torch

    runs, targets = [], []
    for spec in settings.models:
        label = f"quantization {spec.name}"
        source = workspace.fp32(spec, settings.seed)
        fp32, tokenizer = load_model_and_tokenizer(source)
        folders = {BASELINE: source}
        for variant in VARIANTS[1:]:
            progress(f"{label}: making {variant}")
            folders[variant] = make_variant(fp32, variant, source, workspace, spec, settings)
        models = {BASELINE: fp32.eval()}
        for variant in VARIANTS[1:]:
            models[variant] = load_model_and_tokenizer(folders[variant])[0].eval()
        single = fixed_inputs(tokenizer, settings.input_tokens, 1)
        batch = fixed_inputs(tokenizer, settings.input_tokens, settings.throughput_batch)
        n = settings.new_tokens
        with torch.inference_mode():
            latency = interleaved({v: (lambda m=m: generate_fixed(m, single, n)) for v, m in models.items()},
                                  settings.warmup, settings.repeats, progress, f"{label} batch 1")
            generated = settings.throughput_batch * n
            throughput = interleaved({v: (lambda m=m: generate_fixed(m, batch, n)) for v, m in models.items()},
                                     settings.warmup, settings.repeats, progress,
                                     f"{label} batch {settings.throughput_batch}", unit="tokens/s",
                                     measure=lambda _v, seconds, _r: generated / seconds)
        del models, fp32
        gc.collect()
        variants = {}
        for variant in VARIANTS:
            size = size_on_disk(folders[variant])["weights_bytes"]
            figures = {"weights_bytes": quantity(size, "bytes"),
                       "latency_batch1": spread(latency[variant], "ms"),
                       "throughput": spread(throughput[variant], "tokens/s")}
            if settings.memory:
                child = run_child({"task": "generate", "model_dir": str(folders[variant]), "new_tokens": n,
                                   "inputs": {k: t.tolist() for k, t in batch.items()}}, progress, f"{label} {variant}")
                figures["peak_rss"] = quantity(child["peak_rss_bytes"], "bytes",
                                               measured=f"fresh process: load, then generate at batch "
                                                        f"{settings.throughput_batch}",
                                               rss_before_load_bytes=child["rss_before_load_bytes"])
            variants[variant] = figures
        base = variants[BASELINE]
        ratios = {}
        for variant in VARIANTS[1:]:
            v = variants[variant]
            ratios[variant] = {
                "size_smaller": size_ratio(base["weights_bytes"]["value"], v["weights_bytes"]["value"],
                                           f"fp32 weight bytes / {variant} weight bytes"),
                "latency_faster": ratio(latency[BASELINE], latency[variant], f"fp32 latency / {variant} latency, batch 1"),
                "throughput_gain": ratio(throughput[variant], throughput[BASELINE],
                                         f"{variant} tokens/s / fp32 tokens/s, batch {settings.throughput_batch}"),
            }
            if settings.memory:
                ratios[variant]["peak_rss_smaller"] = size_ratio(base["peak_rss"]["value"], v["peak_rss"]["value"],
                                                                 f"fp32 peak RSS / {variant} peak RSS")
        runs.append({"model": spec.card(), "variants": variants, "ratios": ratios})
        targets.append(target(f"quantization.int8_dynamic_size.{spec.name}",
                              f"{spec.name}: int8-dynamic weights at least 2x smaller than fp32",
                              ratios["int8-dynamic"]["size_smaller"]["value"], "x", 2.0, at_least=True))
        targets.append(target(f"quantization.int8_dynamic_latency.{spec.name}",
                              f"{spec.name}: int8-dynamic generation at least 1.5x faster than fp32 at batch 1",
                              ratios["int8-dynamic"]["latency_faster"]["value"], "x", 1.5, at_least=True))
        for variant in VARIANTS[1:]:
            shutil.rmtree(folders[variant], ignore_errors=True)   # fp32 stays: later sections start from it
    return SectionResult(figures={"runs": runs, "baseline": BASELINE, "variants": list(VARIANTS)}, targets=targets,
                         notes=["int8 variants keep wo, lm_head, embeddings and layer norms in fp32 "
                                "(stepkit.quantization); the weight bytes count every weight file."])
