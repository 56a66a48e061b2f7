"""Seq2seq training shared by the tiny model's warm-up, the LoRA fine-tune and later steps.

One place sets up transformers' Seq2SeqTrainer: precision (bf16 where the hardware has it,
never fp16, which overflows in T5), progress lines with tokens/s, the loss curve as JSON,
early stopping on validation loss and resuming from a checkpoint folder. :func:`plan_memory`
sizes what activations may take (checkpointing, the evaluation batch) from the model's dims,
the data's lengths and the memory available.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .catalog import GIB, T5Dims, available_memory_bytes
from .errors import StepError
from .prompt import format_prompt

Progress = Callable[[str], None]
# (model, batch) -> (loss, model outputs): a loss other than the model's own, e.g. distillation.
# The loss is a mean over the batch's target tokens, like the model's own.
LossFunction = Callable[[Any, dict], tuple[Any, Any]]


@dataclass
class TrainSettings:
    max_steps: int
    learning_rate: float
    batch_size: int = 16
    eval_batch_size: int = 64
    warmup_steps: int = 0
    weight_decay: float = 0.0
    lr_scheduler: str = "linear"
    logging_steps: int = 10
    eval_steps: int = 0  # 0: no evaluation during training
    early_stopping_patience: int = 0  # evaluations without improvement before stopping; 0: off
    gradient_checkpointing: bool = False
    precision: str = "auto"  # auto | bf16 | fp32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise StepError(f"--max-steps must be at least 1, got {self.max_steps}")
        if not 0 < self.learning_rate < 1:
            raise StepError(f"--learning-rate must be in (0, 1), got {self.learning_rate}")
        if self.batch_size < 1:
            raise StepError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.eval_batch_size < 1:
            raise StepError(f"--eval-batch-size must be at least 1, got {self.eval_batch_size}")
        if self.warmup_steps < 0 or self.eval_steps < 0 or self.early_stopping_patience < 0:
            raise StepError(f"--warmup-steps, --eval-steps and --early-stopping-patience must be 0 or more, got "
                            f"{self.warmup_steps}, {self.eval_steps} and {self.early_stopping_patience}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise StepError(f"--precision must be auto, bf16 or fp32 (never fp16 for T5), got {self.precision!r}")
        if self.early_stopping_patience and not self.eval_steps:
            raise StepError("early stopping needs evaluation: set --eval-steps above 0")


def add_training_arguments(group, max_steps: int = 300, learning_rate: float = 1e-3) -> None:
    """The training flags every training step shares (fine-tune, distill), declared once."""
    group.add_argument("--max-steps", type=int, default=max_steps,
                       help=f"optimizer steps (default: {max_steps}); training stops by step count, not time, "
                            "so results reproduce on a loaded machine")
    group.add_argument("--learning-rate", type=float, default=learning_rate,
                       help=f"peak learning rate (default: {learning_rate:g})")
    group.add_argument("--batch-size", type=int, default=16, help="examples per step (default: 16)")
    group.add_argument("--warmup-steps", type=int, default=20, help="linear learning-rate warm-up steps (default: 20)")
    group.add_argument("--eval-steps", type=int, default=50,
                       help="evaluate the training loss on validation every N steps; 0: never (default: 50)")
    group.add_argument("--early-stopping-patience", type=int, default=3,
                       help="stop after N evaluations without a better validation loss, keep the best; 0: off (default: 3)")
    group.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                       help="auto: bf16 where the GPU supports it, else fp32; fp16 is not offered (T5 overflows in it)")
    group.add_argument("--max-source-length", type=int, default=512, help="dialogue prompt tokens kept (default: 512)")
    group.add_argument("--max-target-length", type=int, default=128, help="summary tokens kept (default: 128)")
    group.add_argument("--max-train-examples", type=int, help="use only the first N training examples (quick runs)")


def train_settings(args, **more: Any) -> TrainSettings:
    """The settings :func:`add_training_arguments`' flags give, checked (with the length flags) before anything loads."""
    check_data_limits(args)
    return TrainSettings(max_steps=args.max_steps, learning_rate=args.learning_rate, batch_size=args.batch_size,
                         warmup_steps=args.warmup_steps, eval_steps=args.eval_steps,
                         early_stopping_patience=args.early_stopping_patience if args.eval_steps else 0,
                         precision=args.precision, logging_steps=max(1, min(25, args.max_steps // 10)), seed=args.seed,
                         **more)


def check_data_limits(args) -> None:
    """The length and example-count flags of :func:`add_training_arguments` (and steps' own
    ``--max-validation-examples``), checked before anything loads."""
    for flag in ("max_train_examples", "max_validation_examples"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise StepError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.max_source_length < 8 or args.max_target_length < 4:
        raise StepError("--max-source-length must be at least 8 and --max-target-length at least 4")


@dataclass
class Encoded:
    """Tokenized examples and how many of them were cut to the length limits."""

    features: list[dict]
    truncated_sources: int = 0
    truncated_targets: int = 0


@dataclass
class TrainResult:
    steps: int
    seconds: float
    tokens_per_second: float
    curve: list[dict] = field(default_factory=list)  # one entry per logged train/eval point
    best_eval_loss: float | None = None
    stopped_early: bool = False

    def to_json(self) -> dict:
        return asdict(self)


def encode_pairs(tokenizer, sources: Sequence[str], targets: Sequence[str], max_source_length: int,
                 max_target_length: int) -> Encoded:
    """Tokenize source/target pairs, counting truncations instead of hiding them."""
    sources_ids = tokenizer(list(sources), add_special_tokens=True)["input_ids"]
    targets_ids = tokenizer(list(targets), add_special_tokens=True)["input_ids"]
    encoded = Encoded(features=[])
    eos = tokenizer.eos_token_id
    for source, target in zip(sources_ids, targets_ids):
        if len(source) > max_source_length:
            encoded.truncated_sources += 1
            source = source[: max_source_length - 1] + [eos]
        if len(target) > max_target_length:
            encoded.truncated_targets += 1
            target = target[: max_target_length - 1] + [eos]
        encoded.features.append({"input_ids": source, "attention_mask": [1] * len(source), "labels": target})
    return encoded


def encode_records(tokenizer, rows: Sequence[dict], max_source_length: int, max_target_length: int) -> Encoded:
    """Prompt + dialogue → first reference summary, for the summarization task."""
    return encode_pairs(tokenizer, [format_prompt(r["dialogue"]) for r in rows], [r["summary"] for r in rows],
                        max_source_length, max_target_length)


def resolve_bf16(precision: str) -> bool:
    import torch

    has_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if precision == "bf16" and not has_bf16:
        raise StepError("--precision bf16 needs a GPU with bf16 support; none found (use auto or fp32)")
    return precision == "bf16" or (precision == "auto" and has_bf16)


def _progress_callback(progress: Progress, label: str, max_steps: int):
    from transformers import TrainerCallback

    class ProgressLines(TrainerCallback):
        """Plain lines (no tqdm bars): they read well in CloudWatch logs and in CI."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()
            self.tokens_at_start = state.num_input_tokens_seen

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            rate = (state.num_input_tokens_seen - self.tokens_at_start) / elapsed
            if "loss" in logs:
                progress(f"[{label}] epoch {state.epoch:.2f} | step {state.global_step}/{max_steps} | "
                         f"loss {logs['loss']:.4f} | lr {logs.get('learning_rate', 0):.2e} | {rate:,.0f} tokens/s")
            if "eval_loss" in logs:
                progress(f"[{label}] step {state.global_step}/{max_steps} | validation loss {logs['eval_loss']:.4f}")

    return ProgressLines()


def _threads_callback(progress: Progress, label: str, every_seconds: float = 5.0):
    """Every few seconds, torch's intra-op threads set to the cores other processes leave free (stepkit.threads)."""
    import torch
    from transformers import TrainerCallback

    from .threads import ThreadsThatFit, threads_override

    class FittingThreads(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.fit, self.checked = ThreadsThatFit(), time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            if time.monotonic() - self.checked < every_seconds:
                return
            self.checked = time.monotonic()
            threads = self.fit.check()
            if threads and threads != torch.get_num_threads():
                progress(f"[{label}] step {state.global_step}: {threads} thread(s) from now on "
                         f"(other work {'left' if threads > torch.get_num_threads() else 'took'} cores)")
                torch.set_num_threads(threads)

    return None if threads_override() else FittingThreads()


def train_seq2seq(model, tokenizer, train: Encoded, validation: Encoded | None, settings: TrainSettings,
                  checkpoint_dir: str | Path, label: str, progress: Progress = print,
                  resume: bool = True, compute_loss: LossFunction | None = None) -> TrainResult:
    """Train ``model`` in place; checkpoints go to ``checkpoint_dir`` and a run there is resumed.

    ``compute_loss`` replaces the model's own cross-entropy for training and for the validation
    loss in the curve (and early stopping); without it the model's loss is used.
    """
    from transformers import (DataCollatorForSeq2Seq, EarlyStoppingCallback, PrinterCallback, Seq2SeqTrainer,
                              Seq2SeqTrainingArguments)
    from transformers.trainer_utils import get_last_checkpoint

    if not train.features:
        raise StepError("no training examples")
    evaluate = bool(settings.eval_steps and validation and validation.features)
    keep_checkpoints = settings.eval_steps or max(settings.max_steps // 4, 1)
    args = Seq2SeqTrainingArguments(
        output_dir=str(checkpoint_dir),
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.eval_batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        logging_steps=settings.logging_steps,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=settings.eval_steps if evaluate else None,
        save_strategy="steps",
        save_steps=keep_checkpoints,
        save_total_limit=2,
        load_best_model_at_end=evaluate and settings.early_stopping_patience > 0,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        # Passed only when on: the name is deprecated in transformers 5 but the Hugging Face
        # training images (up to 5.3) don't know its successor.
        **({"gradient_checkpointing": True} if settings.gradient_checkpointing else {}),
        bf16=resolve_bf16(settings.precision),
        seed=settings.seed,
        data_seed=settings.seed,
        train_sampling_strategy="group_by_length",  # less padding: long dialogues batch together
        include_num_input_tokens_seen="non_padding",
        # Evaluation needs the loss only; without this the Trainer keeps every batch's logits
        # (examples x target tokens x 32128 floats for Flan-T5) and concatenates them.
        prediction_loss_only=True,
        disable_tqdm=True,
        report_to="none",
        log_level="warning",
        use_cpu=not _cuda_available(),
        dataloader_num_workers=0,
        # Under torchrun the Trainer wraps the model in DDP; every trained parameter (LoRA, the student)
        # is used in each forward, so the per-step search for unused ones is pure overhead.
        ddp_find_unused_parameters=False,
    )
    callbacks = [_progress_callback(progress, label, settings.max_steps)]
    fitting_threads = _threads_callback(progress, label)
    if fitting_threads:
        callbacks.append(fitting_threads)
    if args.load_best_model_at_end:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=settings.early_stopping_patience))
    trainer_class = Seq2SeqTrainer if compute_loss is None else _trainer_with_loss(compute_loss)
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train.features,
        eval_dataset=validation.features if evaluate else None,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; ProgressLines says it better
    last = get_last_checkpoint(str(checkpoint_dir)) if resume and Path(checkpoint_dir).is_dir() else None
    if last:
        progress(f"[{label}] resuming from checkpoint {last}")
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=last)
    seconds = time.perf_counter() - started
    curve = [_curve_point(entry) for entry in trainer.state.log_history if "loss" in entry or "eval_loss" in entry]
    eval_losses = [point["eval_loss"] for point in curve if "eval_loss" in point]
    tokens = output.metrics.get("num_input_tokens_seen", trainer.state.num_input_tokens_seen)
    return TrainResult(
        steps=trainer.state.global_step,
        seconds=round(seconds, 2),
        tokens_per_second=round(tokens / seconds, 1) if seconds > 0 else 0.0,
        curve=curve,
        best_eval_loss=min(eval_losses) if eval_losses else None,
        stopped_early=trainer.state.global_step < settings.max_steps,
    )


def _trainer_with_loss(loss_function: LossFunction):
    from transformers import Seq2SeqTrainer

    class CustomLossTrainer(Seq2SeqTrainer):
        loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides it by gradient-accumulation steps

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = loss_function(model, inputs)
            return (loss, outputs) if return_outputs else loss

    return CustomLossTrainer


def _curve_point(entry: dict) -> dict:
    keep = ("step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm")
    return {k: entry[k] for k in keep if k in entry and not (isinstance(entry[k], float) and math.isnan(entry[k]))}


# ----------------------------------------------------------------------------- memory
# Activations of one example, counted in copies of each tensor alive at the peak. Fitted to peak
# RSS measured on flan-t5-base (fp32, CPU, LoRA on q and v, 512 source and 128 target tokens):
# 1.8 GiB per training example, 0.27 GiB with activation checkpointing, 80 MB per evaluated one.
ATTENTION_COPIES = 6      # scores, + position bias, softmax, dropout mask and output, for the backward pass
FEED_FORWARD_COPIES = 6   # wi_0, wi_1, GELU, their product, dropout
WIDTH_COPIES = 12         # per attention: q, k, v, its output; norms and residuals
LOGITS_COPIES = 4         # logits, log-softmax and their gradients (vocabulary-wide)
EVALUATION_COPIES = 3     # without gradients only the layer running holds tensors
ACTIVATION_SHARE = 0.25   # of the memory available: the rest stays for the weights and everything else running
MAX_ACTIVATION_BYTES = 4 * GIB   # so that a fine-tune of flan-t5-base peaks under 8 GiB wherever it runs
MAX_EVAL_BATCH_SIZE = 64  # on CPU, larger batches of 512-token sources are slower per example, not faster


def activation_bytes(dims: T5Dims, source_tokens: int, target_tokens: int, mode: str, element_bytes: int = 4) -> int:
    """Peak activation memory of one example of these lengths: ``mode`` is ``train`` (every layer keeps its
    activations for the backward pass), ``checkpointed`` (each block keeps its input and recomputes the rest,
    one block at a time) or ``eval`` (no gradients)."""
    heads, width, ff, vocabulary = dims.num_heads, dims.d_model, dims.d_ff, dims.vocab_size
    source, target = source_tokens, target_tokens
    attention_maps = heads * (source * source + target * target + target * source)
    encoder_block = (ATTENTION_COPIES * heads * source * source + FEED_FORWARD_COPIES * source * ff
                     + WIDTH_COPIES * source * width)
    decoder_block = (ATTENTION_COPIES * heads * (target * target + target * source) + FEED_FORWARD_COPIES * target * ff
                     + 2 * WIDTH_COPIES * target * width)  # self- and cross-attention
    head = LOGITS_COPIES * target * vocabulary
    if mode == "train":
        elements = dims.num_layers * encoder_block + dims.num_decoder_layers * decoder_block + head
    elif mode == "checkpointed":  # block inputs, the shared position biases, one block recomputed with its gradients
        block_inputs = (dims.num_layers * source + dims.num_decoder_layers * target) * width
        elements = block_inputs + attention_maps + 2 * max(encoder_block, decoder_block) + head
    elif mode == "eval":
        elements = EVALUATION_COPIES * (heads * source * source + source * ff + target * vocabulary)
    else:
        raise ValueError(f"mode {mode!r}: expected train, checkpointed or eval")
    return elements * element_bytes


def activation_budget(available_bytes: int) -> int:
    """What a step lets activations take: a share of the memory available, capped (see the constants)."""
    return max(0, min(MAX_ACTIVATION_BYTES, int(available_bytes * ACTIVATION_SHARE)))


def memory_available_to(model) -> int:
    """Free memory where ``model``'s activations go: its GPU's, else the host's (a cgroup limit counts)."""
    import torch

    device = next(model.parameters()).device
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_memory_bytes()


def longest(data: Encoded) -> tuple[int, int]:
    """(source, target) tokens of the longest examples: a batch is padded to its longest."""
    return (max((len(f["input_ids"]) for f in data.features), default=0),
            max((len(f["labels"]) for f in data.features), default=0))


def evaluation_batch_size(dims: T5Dims, data: Encoded, budget_bytes: int, element_bytes: int = 4) -> int:
    """The most examples of ``data`` whose evaluation activations fit ``budget_bytes`` (1 to MAX_EVAL_BATCH_SIZE)."""
    per_example = activation_bytes(dims, *longest(data), mode="eval", element_bytes=element_bytes)
    return max(1, min(MAX_EVAL_BATCH_SIZE, budget_bytes // max(per_example, 1)))


@dataclass(frozen=True)
class MemoryPlan:
    """How training fits its memory: activation checkpointing or not, and the evaluation batch size."""

    available_bytes: int
    budget_bytes: int
    batch_examples: int
    source_tokens: int
    target_tokens: int
    train_bytes: int          # activations of the largest training batch, every layer keeping its own
    checkpointed_bytes: int   # the same with activation checkpointing
    gradient_checkpointing: bool
    eval_batch_size: int

    @property
    def activations_bytes(self) -> int:
        """The training batch's activations as it will run."""
        return self.checkpointed_bytes if self.gradient_checkpointing else self.train_bytes

    def describe(self) -> str:
        return (f"memory: a training batch of {self.batch_examples} x {self.source_tokens}+{self.target_tokens} tokens "
                f"needs ~{self.train_bytes / GIB:.1f} GiB of activations, ~{self.checkpointed_bytes / GIB:.1f} GiB "
                f"checkpointed; budget {self.budget_bytes / GIB:.1f} GiB of {self.available_bytes / GIB:.1f} GiB "
                f"available: gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}, evaluation batch "
                f"{self.eval_batch_size}")

    def card(self) -> dict:
        return {"gradient_checkpointing": self.gradient_checkpointing, "eval_batch_size": self.eval_batch_size,
                "activation_budget_bytes": self.budget_bytes, "estimated_activation_bytes": self.activations_bytes}


def plan_memory(dims: T5Dims, train: Encoded, validation: Encoded | None, batch_size: int, available_bytes: int,
                element_bytes: int = 4, gradient_checkpointing: bool | None = None,
                eval_batch_size: int | None = None) -> MemoryPlan:
    """Checkpoint activations when a training batch's would pass the budget (off for small models, where it
    only costs time); size the evaluation batch from the budget. A value given (a flag) is kept as given."""
    budget = activation_budget(available_bytes)
    examples = min(batch_size, len(train.features))
    source, target = longest(train)
    train_bytes = examples * activation_bytes(dims, source, target, "train", element_bytes)
    checkpointed_bytes = examples * activation_bytes(dims, source, target, "checkpointed", element_bytes)
    if gradient_checkpointing is None:
        gradient_checkpointing = train_bytes > budget
    if eval_batch_size is None:
        eval_batch_size = (evaluation_batch_size(dims, validation, budget, element_bytes)
                           if validation and validation.features else MAX_EVAL_BATCH_SIZE)
    return MemoryPlan(available_bytes=available_bytes, budget_bytes=budget, batch_examples=examples,
                      source_tokens=source, target_tokens=target, train_bytes=train_bytes,
                      checkpointed_bytes=checkpointed_bytes, gradient_checkpointing=gradient_checkpointing,
                      eval_batch_size=eval_batch_size)


def evaluation_loss(model, tokenizer, data: Encoded, batch_size: int | None = None) -> float:
    """Mean token-level cross-entropy on ``data`` (for before/after comparisons).

    ``batch_size`` None: as many examples as fit the activation budget (:func:`evaluation_batch_size`).
    """
    import torch
    from transformers import DataCollatorForSeq2Seq

    if batch_size is None:
        element_bytes = next(model.parameters()).element_size()
        batch_size = evaluation_batch_size(T5Dims.from_config(model.config), data,
                                           activation_budget(memory_available_to(model)), element_bytes)
    collate = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)
    model.eval()
    total_loss, total_tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data.features), batch_size):
            batch = collate(data.features[start:start + batch_size]).to(model.device)
            tokens = int((batch["labels"] != -100).sum())
            total_loss += float(model(**batch).loss) * tokens
            total_tokens += tokens
    return total_loss / max(total_tokens, 1)


def write_curve(path: str | Path, result: TrainResult, **extra) -> None:
    Path(path).write_text(json.dumps({**extra, **result.to_json()}, indent=2) + "\n", encoding="utf-8")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
