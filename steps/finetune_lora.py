"""PEFT LoRA fine-tune of a Flan-T5 model on the prepared dialogue → summary splits.

Writes to ``--output-dir`` (SageMaker's model dir, packed as model.tar.gz):
  the merged model (base + LoRA, a plain save_pretrained folder the next steps load),
  ``adapter/`` (the LoRA adapter alone), ``training_curve.json`` (loss per step, validation
  loss per evaluation) and ``model_card.json``.

Checkpoints go to ``--checkpoint-dir`` (SageMaker syncs /opt/ml/checkpoints to S3 when the
pipeline passes it); a run finding checkpoints there resumes from the latest one.

Memory: activations, not weights, decide the peak (flan-t5-base, batch 16 of 512-token dialogues:
about 29 GiB kept for the backward pass; with activation checkpointing the whole run peaks at
5.7 GiB). By default gradient checkpointing is on when a training batch's estimated activations
pass the activation budget (a quarter of the memory available, at most 4 GiB) and off where they
fit (the tiny model: there it would only cost time); the evaluation batch is as large as fits the
same budget, at most 64. ``--[no-]gradient-checkpointing`` and ``--eval-batch-size`` override
the choice; the card records what ran.

Example:
  python steps/finetune_lora.py --model-dir out/model --data-dir out/data --output-dir out/finetuned \\
      --lora-r 16 --lora-alpha 32 --target-modules all-linear --max-steps 300
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from stepkit.catalog import T5Dims
from stepkit.contract import atomic_output_dir, env_path, path_help, require_output_dir, require_path
from stepkit.errors import StepError, run_step
from stepkit.lora import LoraSettings, add_lora_arguments, attach_lora
from stepkit.modelcard import read_model_card
from stepkit.modelcheck import check_model_dir
from stepkit.modeling import load_model_and_tokenizer, save_model
from stepkit.records import read_split
from stepkit.threads import configure_runtime
from stepkit.training import (TrainSettings, add_training_arguments, encode_records, evaluation_loss,
                              memory_available_to, plan_memory, resolve_bf16, train_seq2seq, train_settings, write_curve)

MODEL_ENV = ("SM_CHANNEL_MODEL",)
DATA_ENV = ("SM_CHANNEL_DATA", "SM_CHANNEL_TRAIN")
OUTPUT_ENV = ("SM_MODEL_DIR",)
ADAPTER_DIR = "adapter"
CURVE_FILE = "training_curve.json"


def build_parser() -> argparse.ArgumentParser:
    """This script's flags (flanops checks a config's ``steps`` settings against them)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # --max-step must not pass for --max-steps
    paths = parser.add_argument_group("paths")
    paths.add_argument("--model-dir", default=env_path(*MODEL_ENV), help=path_help("base model folder (select_model.py output)", *MODEL_ENV))
    paths.add_argument("--data-dir", default=env_path(*DATA_ENV), help=path_help("prepared splits (prepare_data.py output)", *DATA_ENV))
    paths.add_argument("--output-dir", default=env_path(*OUTPUT_ENV), help=path_help("where the merged model and adapter go", *OUTPUT_ENV))
    paths.add_argument("--checkpoint-dir", help="checkpoints, resumed from when present (SageMaker: /opt/ml/checkpoints); "
                                                "default: a temporary folder, no resume")
    paths.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    add_lora_arguments(parser.add_argument_group("LoRA"), r=32, alpha=32, dropout=0.05, target_modules="q,v")
    train = parser.add_argument_group("training")
    add_training_arguments(train)
    train.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                       help="recompute activations in the backward pass instead of keeping them: far less memory, "
                            "about a third more compute (default: on when a training batch's activations would pass "
                            "the budget, a quarter of the available memory and at most 4 GiB; off for small models)")
    train.add_argument("--eval-batch-size", type=int,
                       help="validation examples per forward pass (default: as many as fit the activation budget, "
                            "at most 64)")
    train.add_argument("--seed", type=int, default=0)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_flags(args: argparse.Namespace) -> tuple[LoraSettings, TrainSettings]:
    """Every setting that needs no file, checked before anything loads (flanops checks a config's with it too)."""
    given = {"eval_batch_size": args.eval_batch_size} if args.eval_batch_size is not None else {}
    return LoraSettings.from_args(args), train_settings(args, **given)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_dir = require_path(args.model_dir, "--model-dir", *MODEL_ENV)
    data_dir = require_path(args.data_dir, "--data-dir", *DATA_ENV)
    output_dir = require_output_dir(args.output_dir, "--output-dir", args.overwrite, *OUTPUT_ENV)
    lora, settings = check_flags(args)
    train_rows = read_split(data_dir, "train")[: args.max_train_examples]
    validation_rows = read_split(data_dir, "validation")
    configure_runtime()

    from transformers import set_seed

    set_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(model_dir)
    base_card = read_model_card(check_model_dir(model_dir))  # the card inside model.tar.gz when given one
    train = encode_records(tokenizer, train_rows, args.max_source_length, args.max_target_length)
    validation = encode_records(tokenizer, validation_rows, args.max_source_length, args.max_target_length)
    for name, data, rows in (("train", train, train_rows), ("validation", validation, validation_rows)):
        if data.truncated_sources or data.truncated_targets:
            print(f"warning: {name}: {data.truncated_sources} of {len(rows)} prompts cut to --max-source-length "
                  f"{args.max_source_length}, {data.truncated_targets} summaries cut to --max-target-length {args.max_target_length}")
    bf16 = resolve_bf16(settings.precision)
    memory = plan_memory(T5Dims.from_config(model.config), train, validation, settings.batch_size,
                         memory_available_to(model), element_bytes=2 if bf16 else 4,
                         gradient_checkpointing=args.gradient_checkpointing, eval_batch_size=args.eval_batch_size)
    print(memory.describe())
    settings = replace(settings, gradient_checkpointing=memory.gradient_checkpointing,
                       eval_batch_size=memory.eval_batch_size)
    if settings.gradient_checkpointing:
        model.config.use_cache = False  # the KV cache and checkpointing don't mix during training

    model = attach_lora(model, lora)
    loss_before = evaluation_loss(model, tokenizer, validation, settings.eval_batch_size)
    print(f"validation loss before fine-tuning: {loss_before:.4f}")
    with tempfile.TemporaryDirectory(prefix="lora-checkpoints-") as scratch:
        checkpoints = Path(args.checkpoint_dir) if args.checkpoint_dir else Path(scratch)
        try:
            checkpoints.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StepError(f"--checkpoint-dir {checkpoints}: cannot create it ({err.strerror})") from None
        result = train_seq2seq(model, tokenizer, train, validation, settings, checkpoints, label="lora",
                               resume=bool(args.checkpoint_dir))
    loss_after = evaluation_loss(model, tokenizer, validation, settings.eval_batch_size)
    print(f"validation loss: {loss_before:.4f} → {loss_after:.4f} after {result.steps} steps "
          f"({result.seconds:.0f} s, {result.tokens_per_second:,.0f} tokens/s)")

    trainable, total = model.get_nb_trainable_parameters()
    lora_settings = {**lora.card(), "trainable_parameters": trainable,
                     "trainable_percent": round(100 * trainable / total, 4)}
    with atomic_output_dir(output_dir, args.overwrite) as staging:
        model.save_pretrained(staging / ADAPTER_DIR)
        tokenizer.save_pretrained(staging / ADAPTER_DIR)
        merged = model.merge_and_unload()
        card = {
            "base_model": base_card.get("base_model", str(model_dir)),
            "base_model_card": base_card,
            "method": "lora",
            "lora": lora_settings,
            "training": {"steps": result.steps, "seconds": result.seconds, "tokens_per_second": result.tokens_per_second,
                         "stopped_early": result.stopped_early, "learning_rate": args.learning_rate,
                         "batch_size": args.batch_size, "train_examples": len(train_rows), "seed": args.seed,
                         "precision": "bf16" if bf16 else "fp32", **memory.card()},
            "validation_loss": {"before": round(loss_before, 4), "after": round(loss_after, 4),
                                "best_during_training": result.best_eval_loss},
            "truncated": {"train_sources": train.truncated_sources, "train_targets": train.truncated_targets},
        }
        save_model(merged, tokenizer, staging, card)
        write_curve(staging / CURVE_FILE, result, label="lora", validation_loss_before=loss_before,
                    validation_loss_after=loss_after)
    print(f"wrote the merged model, {ADAPTER_DIR}/ and {CURVE_FILE} to {output_dir}")
    return 0


if __name__ == "__main__":
    started = time.perf_counter()
    code = run_step(main)
    print(f"finetune_lora finished in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    sys.exit(code)
