"""Peers: flanops' variants next to CTranslate2 int8 converted by its own CLI and ONNX Runtime int8 (optimum).

The peers themselves (conversion, the ONNX Runtime process, timing) are in peer_runtimes.py. The
sides are timed together with the quantization section's (one measurement per model:
quantization.compare); this section reports the peers and the ratios: flanops' ct2-int8 vs each
peer (latency at batch 1, size), each vs fp32.
"""
from __future__ import annotations

from .harness import BenchSettings, Progress, SectionResult, ratio, size_ratio, target
from .peer_runtimes import CT2, FLANOPS_INT8, ONNX, ONNX_OVERLAY, WITHIN, peer_models
from .quantization import BASELINE, compare
from .subjects import Workspace

TITLE = "Peers: CTranslate2 and ONNX Runtime int8"


# ----------------------------------------------------------------------------- the section
def run(settings: BenchSettings, workspace: Workspace, progress: Progress) -> SectionResult:
    runs, targets = [], []
    for spec in peer_models(settings):
        measured = compare(spec, settings, workspace, progress)
        sides = measured["sides"]
        int8 = sides[FLANOPS_INT8]
        against, vs_fp32 = {}, {}
        for name, side in sides.items():
            if side["runtime"] == "transformers" or name == FLANOPS_INT8:
                continue
            against[name] = {
                "latency": ratio(int8["latency_batch1"]["samples"], side["latency_batch1"]["samples"],
                                 f"flanops {FLANOPS_INT8} latency / {name} latency, batch 1"),
                "size": size_ratio(int8["weights_bytes"]["value"], side["weights_bytes"]["value"],
                                   f"flanops {FLANOPS_INT8} weight bytes / {name} weight bytes"),
                "throughput": ratio(int8["throughput"]["samples"], side["throughput"]["samples"],
                                    f"flanops {FLANOPS_INT8} tokens/s / {name} tokens/s, "
                                    f"batch {settings.throughput_batch}"),
            }
            if "peak_rss" in int8 and "peak_rss" in side:
                against[name]["peak_rss"] = size_ratio(int8["peak_rss"]["value"], side["peak_rss"]["value"],
                                                       f"flanops {FLANOPS_INT8} peak RSS / {name} peak RSS")
        for name, side in sides.items():
            if name != BASELINE:
                base = sides[BASELINE]
                vs_fp32[name] = {
                    "latency_faster": ratio(base["latency_batch1"]["samples"], side["latency_batch1"]["samples"],
                                            f"fp32 latency / {name} latency, batch 1"),
                    "size_smaller": size_ratio(base["weights_bytes"]["value"], side["weights_bytes"]["value"],
                                               f"fp32 weight bytes / {name} weight bytes")}
        cli = against.get(CT2, {})
        targets.append(target(f"peers.ct2_cli_latency.{spec.name}",
                              f"{spec.name}: flanops ct2-int8 latency (batch 1) within {WITHIN:g}x of CTranslate2 int8 "
                              "(its CLI)", cli["latency"]["value"] if cli else None, "x", WITHIN, at_least=False))
        targets.append(target(f"peers.ct2_cli_size.{spec.name}",
                              f"{spec.name}: flanops ct2-int8 size within {WITHIN:g}x of CTranslate2 int8 (its CLI)",
                              cli["size"]["value"] if cli else None, "x", WITHIN, at_least=False))
        runs.append({"model": spec.card(), "sides": sides, "against_peers": against, "vs_fp32": vs_fp32,
                     "errors": measured["peer_errors"]})
    return SectionResult(
        figures={"runs": runs, "flanops_int8": FLANOPS_INT8, "peers": [CT2, ONNX],
                 "peer_threads": settings.peer_threads, "onnx_overlay": list(ONNX_OVERLAY)},
        targets=targets,
        notes=[f"Timed in the same rounds as the quantization section's variants (one measurement per model); "
               f"the peers on {settings.peer_threads} intra-op thread(s), flanops' variants on the threads "
               "stepkit.threads gives the model's size.",
               f"{CT2}: the converter's own CLI on the same fp32 folder and a plain ctranslate2.Translator, no flanops "
               "code in the timed path.",
               f"{ONNX}: optimum's export writes the decoder twice (decoder_model and decoder_with_past_model: the "
               "first step and the cached steps), so its weight bytes count both. Weight scales "
               + ("per channel (optimum's default)." if settings.onnx_per_channel else
                  "per tensor (onnx_per_channel off): optimum's per-channel default ran slower in ONNX Runtime's "
                  "dynamic int8 kernels when this comparison was set up; each peer runs as it is fastest."),
               "Peak RSS: a fresh process that has imported its libraries, then loads the model and generates one "
               "batch (the ONNX Runtime process imports transformers 4.57, optimum and onnxruntime besides torch: "
               "compare the growth over the RSS before loading too)."])
