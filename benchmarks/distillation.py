"""Distillation: the teacher vs distill.py's default student, and the other shapes it could have been.

Speed and size do not depend on training, so each student is the shrunk teacher before any
distillation steps (stepkit.distillation.shrink_teacher, blocks chosen by layers_to_keep). The
candidates are shares of the teacher's (encoder, decoder) blocks: distill.py's default (half the
encoder, an eighth of the decoder), the earlier default (half of each), DistilBART 12-3's shape
(the whole encoder, a quarter of the decoder) and others in between; all are timed in the same
interleaved rounds as the teacher. Which one is the default also depends on what each loses in
quality, which only training shows: stepkit/distillation.py gives the quick path's ROUGE-L.
"""
from __future__ import annotations

import gc

from stepkit.cost import size_on_disk
from stepkit.distillation import (DEFAULT_DECODER_FRACTION, DEFAULT_ENCODER_FRACTION, layers_to_keep,
                                          shrink_teacher, student_layer_count)
from stepkit.modeling import count_parameters, load_model_and_tokenizer
from .harness import BenchSettings, Progress, SectionResult, quantity, ratio, size_ratio, spread, target
from .subjects import Workspace, batch1_latency

TITLE = "Distillation"
DEFAULT = "default"
# name → (encoder share, decoder share) of the teacher's blocks
CANDIDATES = {DEFAULT: (DEFAULT_ENCODER_FRACTION, DEFAULT_DECODER_FRACTION), "half of each": (0.5, 0.5),
              "whole encoder, quarter decoder": (1.0, 0.25), "half encoder, quarter decoder": (0.5, 0.25),
              "whole encoder, half decoder": (1.0, 0.5)}
SPEED_TARGET = 2.0   # the issue's: the default student at least 2x faster than its teacher at batch 1


def student_blocks(teacher_config, shares: tuple[float, float]) -> tuple[list[int], list[int]]:
    """The teacher blocks a student with these (encoder, decoder) shares keeps, as distill.py picks them."""
    encoder_total, decoder_total = teacher_config.num_layers, teacher_config.num_decoder_layers
    return (layers_to_keep(encoder_total, student_layer_count(encoder_total, shares[0], None, "encoder share")),
            layers_to_keep(decoder_total, student_layer_count(decoder_total, shares[1], None, "decoder share")))


def run(settings: BenchSettings, workspace: Workspace, progress: Progress) -> SectionResult:
    import torch

    from stepkit.threads import inference_threads

    runs, targets = [], []
    for spec in settings.models:
        label = f"distillation {spec.name}"
        source = workspace.fp32(spec, settings.seed)
        teacher, tokenizer = load_model_and_tokenizer(source)
        teacher.eval()
        torch.set_num_threads(inference_threads(spec.dims.parameters))   # as evaluate.py and the endpoint run it
        models, sides = {"teacher": teacher}, {}
        sides["teacher"] = {"parameters": quantity(count_parameters(teacher), "parameters"),
                            "layers": {"encoder": teacher.config.num_layers, "decoder": teacher.config.num_decoder_layers},
                            "weights_bytes": quantity(size_on_disk(source)["weights_bytes"], "bytes")}
        for name, shares in CANDIDATES.items():
            encoder, decoder = student_blocks(teacher.config, shares)
            if any(side.get("kept_blocks") == {"encoder": encoder, "decoder": decoder} for side in sides.values()):
                continue   # a small teacher can give two candidates the same shape
            student = shrink_teacher(teacher, encoder, decoder).eval()
            folder = workspace.save(student, spec, f"student-{len(models)}", {"method": "distill", "student": {
                "encoder_layers": encoder, "decoder_layers": decoder}})
            models[name] = student
            sides[name] = {"shares": {"encoder": shares[0], "decoder": shares[1]},
                           "parameters": quantity(count_parameters(student), "parameters"),
                           "layers": {"encoder": len(encoder), "decoder": len(decoder)},
                           "kept_blocks": {"encoder": encoder, "decoder": decoder},
                           "weights_bytes": quantity(size_on_disk(folder)["weights_bytes"], "bytes")}
        latency = batch1_latency(models, tokenizer, settings, progress, label)
        ratios = {}
        for name in models:
            sides[name]["latency_batch1"] = spread(latency[name], "ms")
            if name != "teacher":
                ratios[name] = {
                    "latency_faster": ratio(latency["teacher"], latency[name], f"teacher latency / {name} latency"),
                    "size_smaller": size_ratio(sides["teacher"]["weights_bytes"]["value"],
                                               sides[name]["weights_bytes"]["value"],
                                               f"teacher weight bytes / {name} weight bytes")}
        runs.append({"model": spec.card(), "sides": sides, "ratios": ratios})
        targets.append(target(f"distillation.student_latency.{spec.name}",
                              f"{spec.name}: the default student at least {SPEED_TARGET:g}x faster than the teacher "
                              "at batch 1", ratios[DEFAULT]["latency_faster"]["value"], "x", SPEED_TARGET, at_least=True))
        del teacher, models
        gc.collect()
    return SectionResult(figures={"runs": runs, "default": DEFAULT,
                                  "default_shares": {"encoder": DEFAULT_ENCODER_FRACTION,
                                                     "decoder": DEFAULT_DECODER_FRACTION}},
                         targets=targets,
                         notes=["The embeddings and LM head (32128 x d_model each) stay whole in every student, so "
                                "sizes shrink by less than the blocks do.",
                                "Decoder blocks run once per generated token, encoder blocks once per summary: at "
                                f"{settings.input_tokens} prompt tokens and {settings.new_tokens} new tokens both "
                                "weigh on batch-1 latency."])
