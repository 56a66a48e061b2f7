"""LoRA vs full fine-tuning on a Flan-T5-base-shaped model (random weights): what one training step costs.

Both sides take the same optimizer steps (AdamW, as transformers' Trainer uses by default) on
the same fixed batch: forward, backward, step. LoRA is attached with stepkit.lora (configs/
cloud.yaml's settings by default: r 16, alpha 32, q and v). Figures: trainable parameters,
optimizer-state bytes (AdamW keeps two fp32 moments per trainable parameter), gradient bytes,
step time (same process, interleaved), and peak RSS of a fresh process per side.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any

from .harness import BenchSettings, Progress, SectionResult, interleaved, quantity, ratio, run_child, size_ratio, spread
from .subjects import fixed_inputs

TITLE = "LoRA vs full fine-tuning"
SIDES = ("full", "lora")
LEARNING_RATE = 1e-4


@dataclass
class TrainingSide:
    kind: str
    model: Any
    optimizer: Any
    batch: dict

    @classmethod
    def build(cls, kind: str, dims, task: dict, batch: dict) -> "TrainingSide":
        import torch

        from ..steps.stepkit.catalog import build_random_model
        from ..steps.stepkit.lora import LoraSettings, attach_lora

        model = build_random_model(dims, "float32", task["seed"])
        if kind == "lora":
            settings = LoraSettings(r=task["lora_r"], alpha=task["lora_alpha"], dropout=0.05,
                                    target_modules=task["lora_targets"])
            settings.check()
            model = attach_lora(model, settings)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE)
        return cls(kind, model, optimizer, batch)

    def step(self) -> float:
        loss = self.model(**self.batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss)

    def facts(self) -> dict:
        """Parameter and optimizer-state counts (after at least one step: AdamW allocates its state lazily)."""
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        state = sum(t.numel() * t.element_size() for s in self.optimizer.state.values()
                    for t in s.values() if hasattr(t, "numel"))
        return {"trainable_parameters": sum(p.numel() for p in trainable),
                "total_parameters": sum(p.numel() for p in self.model.parameters()),
                "optimizer_state_bytes": state,
                "gradient_bytes": sum(p.numel() * p.element_size() for p in trainable)}


def training_batch(tokenizer, settings: BenchSettings) -> dict:
    """The fixed batch both sides train on: prompts and labels of exact lengths."""
    source = fixed_inputs(tokenizer, settings.train_source_tokens, settings.train_batch)
    labels = fixed_inputs(tokenizer, settings.train_target_tokens, settings.train_batch)["input_ids"]
    return {**source, "labels": labels}


def task(settings: BenchSettings, kind: str, batch: dict) -> dict:
    """What a child process needs to build one side and take two steps (the batch as lists)."""
    return {"task": "train", "kind": kind, "dims": settings.lora_model.dims.as_dict(), "seed": settings.seed,
            "lora_r": settings.lora_r, "lora_alpha": settings.lora_alpha, "lora_targets": settings.lora_targets,
            "batch": {name: tensor.tolist() for name, tensor in batch.items()}, "steps": 2}


def run(settings: BenchSettings, workspace, progress: Progress) -> SectionResult:
    spec = settings.lora_model
    label = f"lora {spec.name}"
    progress(f"{label}: building the full and the LoRA model")
    batch = training_batch(workspace.tokenizer, settings)
    sides = {kind: TrainingSide.build(kind, spec.dims, task(settings, kind, batch), batch) for kind in SIDES}
    # at least one warm-up step each: AdamW allocates its state on the first step
    times = interleaved({kind: side.step for kind, side in sides.items()}, max(1, settings.warmup),
                        settings.repeats, progress, f"{label} step")
    facts = {kind: side.facts() for kind, side in sides.items()}
    del sides
    gc.collect()
    figures: dict[str, dict] = {}
    for kind in SIDES:
        f = facts[kind]
        figures[kind] = {"trainable_parameters": quantity(f["trainable_parameters"], "parameters"),
                         "total_parameters": quantity(f["total_parameters"], "parameters"),
                         "optimizer_state_bytes": quantity(f["optimizer_state_bytes"], "bytes"),
                         "gradient_bytes": quantity(f["gradient_bytes"], "bytes"),
                         "step_time": spread(times[kind], "ms")}
        if settings.memory:
            child = run_child(task(settings, kind, batch), progress, f"{label} {kind}")
            figures[kind]["peak_rss"] = quantity(child["peak_rss_bytes"], "bytes",
                                                 measured="fresh process: build, then 2 optimizer steps",
                                                 rss_before_load_bytes=child["rss_before_load_bytes"])
    full, lora = figures["full"], figures["lora"]
    ratios = {
        "trainable_fewer": size_ratio(full["trainable_parameters"]["value"], lora["trainable_parameters"]["value"],
                                      "full trainable parameters / LoRA trainable parameters"),
        "optimizer_state_smaller": size_ratio(full["optimizer_state_bytes"]["value"],
                                              lora["optimizer_state_bytes"]["value"],
                                              "full optimizer-state bytes / LoRA optimizer-state bytes"),
        "step_faster": ratio(times["full"], times["lora"], "full step time / LoRA step time"),
    }
    if settings.memory:
        ratios["peak_rss_smaller"] = size_ratio(full["peak_rss"]["value"], lora["peak_rss"]["value"],
                                                "full peak RSS / LoRA peak RSS")
    return SectionResult(figures={"model": spec.card(), "sides": figures, "ratios": ratios,
                                  "lora": {"r": settings.lora_r, "alpha": settings.lora_alpha,
                                           "target_modules": settings.lora_targets},
                                  "batch": {"examples": settings.train_batch,
                                            "source_tokens": settings.train_source_tokens,
                                            "target_tokens": settings.train_target_tokens},
                                  "optimizer": f"torch.optim.AdamW, lr {LEARNING_RATE:g}, fp32"},
                         notes=["On CPU the backward pass still runs through every layer with LoRA (activations "
                                "need gradients); LoRA saves the frozen weights' gradients and optimizer state."])
