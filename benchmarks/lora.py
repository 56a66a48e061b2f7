"""LoRA vs full fine-tuning on a Flan-T5-base-shaped model (random weights): what one training step costs.

Both sides take the same optimizer steps (AdamW, as transformers' Trainer uses by default) on
the same fixed batch: forward, backward, step. LoRA is attached with stepkit.lora (configs/
cloud.yaml's settings by default: r 16, alpha 32, q and v). Figures: trainable parameters,
optimizer-state bytes (AdamW keeps two fp32 moments per trainable parameter), gradient bytes,
step time (same process, interleaved), and peak RSS of a fresh process per side.

Then ``python steps/finetune_lora.py`` itself, with its defaults (batch 16, sources up to 512
tokens, summaries up to 128, fp32, its memory plan), a few steps on examples that all reach
those limits (its worst case), in a process of its own: its peak RSS against the 8 GiB target.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .harness import (BenchSettings, Progress, SectionResult, interleaved, quantity, ratio, run_child, run_script,
                      size_ratio, spread, target)
from .subjects import fixed_inputs, long_texts

TITLE = "LoRA vs full fine-tuning"
SIDES = ("full", "lora")
LEARNING_RATE = 1e-4
FINETUNE_BATCH = 16            # finetune_lora.py's defaults, which the peak-RSS figure is about
FINETUNE_SOURCE_TOKENS = 512
FINETUNE_TARGET_TOKENS = 128
FINETUNE_PEAK_LIMIT_GIB = 8.0  # the target: a LoRA fine-tune of flan-t5-base fits a laptop


@dataclass
class TrainingSide:
    kind: str
    model: Any
    optimizer: Any
    batch: dict

    @classmethod
    def build(cls, kind: str, dims, task: dict, batch: dict) -> "TrainingSide":
        import torch

        from stepkit.catalog import build_random_model
        from stepkit.lora import LoraSettings, attach_lora

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


def longest_examples(workspace, train: int, validation: int) -> Path:
    """Prepared splits whose every example reaches finetune_lora.py's default length limits (cut there)."""
    from stepkit.records import split_path, write_jsonl

    folder = workspace.folder("finetune", "data")
    texts = long_texts(train + validation + 1, min_chars=FINETUNE_SOURCE_TOKENS * 8)   # <= 8 characters a token
    rows = []
    for index in range(train + validation):
        summary = texts[index + 1][:FINETUNE_TARGET_TOKENS * 8]
        rows.append({"id": f"long-{index}", "dialogue": texts[index], "summary": summary, "references": [summary]})
    write_jsonl(split_path(folder, "train"), rows[:train])
    write_jsonl(split_path(folder, "validation"), rows[train:])
    return folder


def finetune_peak(settings: BenchSettings, workspace, progress: Progress) -> tuple[dict, dict]:
    """Peak RSS of ``python steps/finetune_lora.py`` with its defaults on the LoRA model (a figure and its target)."""
    from flanops.pipelines.step_scripts import steps_dir
    from stepkit.catalog import GIB
    from stepkit.modelcard import read_model_card

    spec = settings.lora_model
    model_dir = workspace.fp32(spec, settings.seed)
    data_dir = longest_examples(workspace, FINETUNE_BATCH * settings.finetune_steps, settings.finetune_validation)
    output_dir = workspace.folder("finetune", "output")
    arguments = ["--max-steps", str(settings.finetune_steps)]   # everything else: the defaults
    run = run_script(steps_dir() / "finetune_lora.py", ["--model-dir", str(model_dir), "--data-dir", str(data_dir),
                                                         "--output-dir", str(output_dir), *arguments],
                     progress, f"lora {spec.name} finetune_lora.py")
    card = read_model_card(output_dir)
    training = card["training"]
    figure = {"arguments": arguments,
              "examples": {"train": FINETUNE_BATCH * settings.finetune_steps, "validation": settings.finetune_validation,
                           "source_tokens": FINETUNE_SOURCE_TOKENS, "target_tokens": FINETUNE_TARGET_TOKENS,
                           "sources_cut": card["truncated"]["train_sources"]},
              "peak_rss": quantity(run["peak_rss_bytes"], "bytes", measured="fresh process: python steps/finetune_lora.py "
                                   "from start to exit (load, evaluate, train, evaluate, merge, save)"),
              "step_time": quantity(round(training["seconds"] / max(training["steps"], 1), 2), "s",
                                    meaning="the card's training seconds / steps (the evaluation that ends training "
                                            "included)"),
              "wall": quantity(round(run["seconds"], 1), "s"),
              "gradient_checkpointing": training.get("gradient_checkpointing"),
              "eval_batch_size": training.get("eval_batch_size"),
              "estimated_activation_bytes": quantity(training.get("estimated_activation_bytes"), "bytes")}
    peak_gib = round(run["peak_rss_bytes"] / GIB, 2)
    goal = target(f"lora.finetune_peak_rss.{spec.name}",
                  f"{spec.name}: finetune_lora.py with its defaults (batch {FINETUNE_BATCH}, {FINETUNE_SOURCE_TOKENS}-token "
                  f"sources, fp32) peaks under {FINETUNE_PEAK_LIMIT_GIB:g} GiB RSS",
                  peak_gib, "GiB", FINETUNE_PEAK_LIMIT_GIB, at_least=False)
    return figure, goal


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
    targets = []
    finetune = None
    if settings.memory:
        ratios["peak_rss_smaller"] = size_ratio(full["peak_rss"]["value"], lora["peak_rss"]["value"],
                                                "full peak RSS / LoRA peak RSS")
        if settings.mode != "quick":   # one batch-16 step of 512-token sources on flan-t5-base: minutes
            finetune, goal = finetune_peak(settings, workspace, progress)
            targets.append(goal)
    return SectionResult(figures={"model": spec.card(), "sides": figures, "ratios": ratios, "finetune": finetune,
                                  "lora": {"r": settings.lora_r, "alpha": settings.lora_alpha,
                                           "target_modules": settings.lora_targets},
                                  "batch": {"examples": settings.train_batch,
                                            "source_tokens": settings.train_source_tokens,
                                            "target_tokens": settings.train_target_tokens},
                                  "optimizer": f"torch.optim.AdamW, lr {LEARNING_RATE:g}, fp32"},
                         targets=targets,
                         notes=["On CPU the backward pass still runs through every layer with LoRA (activations "
                                "need gradients); LoRA saves the frozen weights' gradients and optimizer state."])
