"""Distillation: the teacher vs the default student (the teacher with half its layers, as distill.py makes it).

Speed and size do not depend on training, so the student is the shrunk teacher before any
distillation steps (stepkit.distillation.shrink_teacher keeps blocks 0, 2, 4, …).
"""
from __future__ import annotations

import gc

from ..steps.stepkit.cost import generate_fixed, size_on_disk
from ..steps.stepkit.distillation import layers_to_keep, shrink_teacher, student_layer_count
from ..steps.stepkit.modeling import count_parameters, load_model_and_tokenizer
from .harness import BenchSettings, Progress, SectionResult, interleaved, quantity, ratio, size_ratio, spread, target
from .subjects import Workspace, fixed_inputs

TITLE = "Distillation"


def run(settings: BenchSettings, workspace: Workspace, progress: Progress) -> SectionResult:
    import torch

    runs, targets = [], []
    for spec in settings.models:
        label = f"distillation {spec.name}"
        source = workspace.fp32(spec, settings.seed)
        teacher, tokenizer = load_model_and_tokenizer(source)
        teacher.eval()
        encoder_total, decoder_total = teacher.config.num_layers, teacher.config.num_decoder_layers
        encoder = layers_to_keep(encoder_total, student_layer_count(encoder_total, settings.student_fraction, None,
                                                                    "--student-layers-fraction"))
        decoder = layers_to_keep(decoder_total, student_layer_count(decoder_total, settings.student_fraction, None,
                                                                    "--student-layers-fraction"))
        student = shrink_teacher(teacher, encoder, decoder).eval()
        folder = workspace.save(student, spec, "student", {"method": "distill", "student": {
            "encoder_layers": encoder, "decoder_layers": decoder}})
        single = fixed_inputs(tokenizer, settings.input_tokens, 1)
        with torch.inference_mode():
            latency = interleaved({"teacher": lambda: generate_fixed(teacher, single, settings.new_tokens),
                                   "student": lambda: generate_fixed(student, single, settings.new_tokens)},
                                  settings.warmup, settings.repeats, progress, f"{label} batch 1")
        sides = {"teacher": {"parameters": quantity(count_parameters(teacher), "parameters"),
                             "layers": {"encoder": encoder_total, "decoder": decoder_total},
                             "weights_bytes": quantity(size_on_disk(source)["weights_bytes"], "bytes"),
                             "latency_batch1": spread(latency["teacher"], "ms")},
                 "student": {"parameters": quantity(count_parameters(student), "parameters"),
                             "layers": {"encoder": len(encoder), "decoder": len(decoder)},
                             "kept_blocks": {"encoder": encoder, "decoder": decoder},
                             "weights_bytes": quantity(size_on_disk(folder)["weights_bytes"], "bytes"),
                             "latency_batch1": spread(latency["student"], "ms")}}
        ratios = {"latency_faster": ratio(latency["teacher"], latency["student"], "teacher latency / student latency"),
                  "size_smaller": size_ratio(sides["teacher"]["weights_bytes"]["value"],
                                             sides["student"]["weights_bytes"]["value"],
                                             "teacher weight bytes / student weight bytes")}
        runs.append({"model": spec.card(), "sides": sides, "ratios": ratios})
        targets.append(target(f"distillation.student_latency.{spec.name}",
                              f"{spec.name}: the default student at least 1.7x faster than the teacher at batch 1",
                              ratios["latency_faster"]["value"], "x", 1.7, at_least=True))
        del teacher, student
        gc.collect()
    return SectionResult(figures={"runs": runs, "student_layers_fraction": settings.student_fraction}, targets=targets,
                         notes=["The embeddings and LM head (32128 x d_model each) stay whole in the student, so its "
                                "size shrinks by less than half."])
