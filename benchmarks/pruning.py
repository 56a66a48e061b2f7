"""Pruning: structured (FFN neurons removed, at two levels) vs dense; unstructured (size only).

Structured pruning chains stepkit.pruning as prune.py does (weight importance, no data
needed): check_structured_amount → weight_scores → choose_units → prune_structured. The
matrices shrink, so both size and latency change. Unstructured pruning (prune_unstructured,
global magnitude) only zeroes weights: the dense file keeps its size and dense kernels do the
same work, so only its gzip-compressed size (what model.tar.gz stores) is reported.
"""
from __future__ import annotations

import copy
import gc

from stepkit.modeling import count_parameters, load_model_and_tokenizer
from stepkit.pruning import (HONESTY_NOTE, check_structured_amount, choose_units, prune_structured,
                                     prune_unstructured, sparsity, weight_scores, weights_size)
from .harness import BenchSettings, Progress, SectionResult, quantity, ratio, size_ratio, spread
from .subjects import Workspace, batch1_latency

TITLE = "Pruning"
TARGET = "ffn"   # prune.py's default target
DENSE = "dense"


def structured_name(amount: float) -> str:
    return f"structured-{round(amount * 100)}%"


def run(settings: BenchSettings, workspace: Workspace, progress: Progress) -> SectionResult:
    runs = []
    for index, spec in enumerate(settings.models):
        label = f"pruning {spec.name}"
        source = workspace.fp32(spec, settings.seed)
        dense, tokenizer = load_model_and_tokenizer(source)
        dense.eval()
        models, folders, details = {DENSE: dense}, {DENSE: source}, {}
        for amount in settings.prune_amounts:
            name = structured_name(amount)
            progress(f"{label}: {name}")
            model = copy.deepcopy(dense)
            remove = check_structured_amount(model.config, TARGET, amount)
            prune_structured(model, choose_units(model, weight_scores(model), remove))
            models[name] = model.eval()
            folders[name] = workspace.save(model, spec, name, {"method": "prune", "pruning": {
                "method": "structured", "target": TARGET, "amount": amount, "importance": "weight"}})
            details[name] = {"removed_per_layer": remove, "d_ff": model.config.d_ff}
        latency = batch1_latency(models, tokenizer, settings, progress, label)
        variants = {}
        for name, model in models.items():
            variants[name] = {"parameters": quantity(count_parameters(model), "parameters"),
                              "weights_bytes": quantity(weights_size(folders[name], compressed=False)["weights_bytes"],
                                                        "bytes"),
                              "latency_batch1": spread(latency[name], "ms"), **details.get(name, {})}
        ratios = {name: {"size_smaller": size_ratio(variants[DENSE]["weights_bytes"]["value"],
                                                    variants[name]["weights_bytes"]["value"],
                                                    f"dense weight bytes / {name} weight bytes"),
                         "latency_faster": ratio(latency[DENSE], latency[name], f"dense latency / {name} latency")}
                  for name in models if name != DENSE}
        run = {"model": spec.card(), "variants": variants, "ratios": ratios}
        if settings.unstructured_models is None or index < settings.unstructured_models:
            run["unstructured"] = unstructured(dense, source, spec, settings, workspace, progress, label)
        runs.append(run)
        del models, dense
        gc.collect()
    return SectionResult(figures={"runs": runs, "structured_target": TARGET, "importance": "weight",
                                  "unstructured_note": HONESTY_NOTE})


def unstructured(dense, source, spec, settings: BenchSettings, workspace: Workspace, progress: Progress,
                 label: str) -> dict:
    name = f"unstructured-{round(settings.unstructured_amount * 100)}%"
    progress(f"{label}: {name} (gzip sizes: a pass over the weights)")
    model = copy.deepcopy(dense)
    prune_unstructured(model, settings.unstructured_amount, "global")
    folder = workspace.save(model, spec, name, {"method": "prune", "pruning": {
        "method": "unstructured", "scope": "global", "amount": settings.unstructured_amount}})
    reached = sparsity(model)
    before, after = weights_size(source, compressed=True), weights_size(folder, compressed=True)
    return {"name": name, "amount": settings.unstructured_amount, "scope": "global",
            "sparsity_overall": quantity(reached["overall"], "fraction"),
            "sparsity_pruned_layers": quantity(reached["pruned_layers"], "fraction"),
            "dense": {"weights_bytes": quantity(before["weights_bytes"], "bytes"),
                      "weights_gzip_bytes": quantity(before["weights_gzip_bytes"], "bytes")},
            "pruned": {"weights_bytes": quantity(after["weights_bytes"], "bytes"),
                       "weights_gzip_bytes": quantity(after["weights_gzip_bytes"], "bytes")},
            "ratios": {"size_smaller": size_ratio(before["weights_bytes"], after["weights_bytes"],
                                                  "dense weight bytes / pruned weight bytes (dense format)"),
                       "gzip_size_smaller": size_ratio(before["weights_gzip_bytes"], after["weights_gzip_bytes"],
                                                       "dense gzip bytes / pruned gzip bytes")},
            "latency": "not measured: the zeros stay in dense tensors, which dense kernels multiply all the same",
            "note": HONESTY_NOTE}
