"""Prune a fine-tuned Flan-T5: structured (remove whole neurons/heads) or unstructured (zero small weights).

structured    removes whole feed-forward neurons (--target ffn), attention heads (heads) or both:
              the matrices shrink, d_ff / num_heads in config.json shrink with them, and the result
              is a smaller dense model that loads with plain from_pretrained and runs faster.
unstructured  zeroes the smallest-magnitude weights of the blocks' Linear layers. The model keeps
              its shape: dense kernels skip no zeros (no speed-up) and the dense safetensors file
              keeps its size; only a compressed (model.tar.gz) or sparse format stores less.

--amount is the fraction removed: of each pruned layer's neurons/heads (structured), or of the
block Linear weights (unstructured). Optionally a short LoRA fine-tune (--recovery-steps, needs
--data-dir) recovers quality and is merged into the weights (for unstructured, the pruned
weights are zeroed again after the merge, so the sparsity survives).

Writes to --output-dir: the pruned model (save_pretrained folder) and model_card.json.

Example:
  python steps/prune.py --model-dir out/finetuned --method structured --target ffn --amount 0.5 \\
      --data-dir out/data --recovery-steps 100 --output-dir out/pruned
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from stepkit.contract import atomic_output_dir, env_path, path_help, require_output_dir, require_path
from stepkit.errors import StepError, run_step
from stepkit.lora import LoraSettings, add_lora_arguments, attach_lora
from stepkit.modelcard import read_model_card, write_model_card
from stepkit.modelcheck import check_model_dir
from stepkit.modeling import count_parameters, load_model_and_tokenizer, save_model
from stepkit.pruning import (HONESTY_NOTE, IMPORTANCE, STRUCTURED_TARGETS, UNSTRUCTURED_SCOPES, activation_scores,
                             check_structured_amount, choose_units, prune_structured, prune_unstructured,
                             reapply_masks, sparsity, structured_units, weight_scores, weights_size)
from stepkit.records import read_split
from stepkit.threads import configure_runtime
from stepkit.training import TrainSettings, check_data_limits, encode_records, evaluation_loss, train_seq2seq

MODEL_ENV = ("SM_CHANNEL_MODEL",)
DATA_ENV = ("SM_CHANNEL_DATA", "SM_CHANNEL_TRAIN")
OUTPUT_ENV = ("SM_MODEL_DIR",)
METHODS = ("structured", "unstructured")


def build_parser() -> argparse.ArgumentParser:
    """This script's flags (flanops checks a config's ``steps`` settings against them)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # --max-step must not pass for --max-steps
    paths = parser.add_argument_group("paths")
    paths.add_argument("--model-dir", default=env_path(*MODEL_ENV), help=path_help("model to prune (finetune_lora.py output)", *MODEL_ENV))
    paths.add_argument("--data-dir", default=env_path(*DATA_ENV),
                       help=path_help("prepared splits (prepare_data.py output); for --recovery-steps, "
                                      "--importance activation and the validation loss in the card", *DATA_ENV))
    paths.add_argument("--output-dir", default=env_path(*OUTPUT_ENV), help=path_help("where the pruned model goes", *OUTPUT_ENV))
    paths.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    pruning = parser.add_argument_group("pruning")
    pruning.add_argument("--method", required=True, help=f"{' or '.join(METHODS)}")
    pruning.add_argument("--amount", type=float, required=True,
                         help="fraction to remove, in (0, 1): of each pruned layer's units (structured) "
                              "or of the block Linear weights (unstructured)")
    pruning.add_argument("--target", help=f"structured: what to remove, {', '.join(STRUCTURED_TARGETS)} (default: ffn)")
    pruning.add_argument("--importance",
                         help=f"structured: how units are ranked, {' or '.join(IMPORTANCE)} (activation needs "
                              "--data-dir; default: activation when --data-dir is given, else weight)")
    pruning.add_argument("--calibration-examples", type=int, default=64,
                         help="training examples run through the model for --importance activation (default: 64)")
    pruning.add_argument("--scope", help="unstructured: one magnitude threshold over all layers (global) or the same "
                                         "fraction in every layer (layer) (default: global)")
    pruning.add_argument("--no-compressed-size", dest="compressed_size", action="store_false",
                         help="skip measuring the gzip-compressed weight size (a pass over the weights)")
    recovery = parser.add_argument_group("recovery fine-tune (LoRA, merged into the weights)")
    recovery.add_argument("--recovery-steps", type=int, default=0, help="optimizer steps; 0: no recovery (default: 0)")
    recovery.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    recovery.add_argument("--batch-size", type=int, default=16, help="examples per step (default: 16)")
    recovery.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default: a tenth of the steps, at most 20)")
    add_lora_arguments(recovery, r=16, alpha=16, dropout=0.05, target_modules="all-linear")
    recovery.add_argument("--max-source-length", type=int, default=512, help="dialogue prompt tokens kept (default: 512)")
    recovery.add_argument("--max-target-length", type=int, default=128, help="summary tokens kept (default: 128)")
    recovery.add_argument("--max-train-examples", type=int, help="use only the first N training examples")
    recovery.add_argument("--max-validation-examples", type=int,
                          help="validation loss (before/after pruning and recovery) on the first N examples only")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_flags(args: argparse.Namespace) -> None:
    """Every setting that needs no file, checked before anything loads (flanops checks a config's with it too)."""
    if args.method not in METHODS:
        raise StepError(f"--method {args.method!r} is not known; choose {' or '.join(METHODS)}")
    if args.amount >= 1:
        raise StepError(f"--amount must be below 1 (it is the fraction removed), got {args.amount}")
    if not args.amount > 0:
        raise StepError(f"--amount must be above 0 (it is the fraction removed), got {args.amount}")
    structured = args.method == "structured"
    for flag, value, applies in (("--target", args.target, structured), ("--importance", args.importance, structured),
                                 ("--scope", args.scope, not structured)):
        if value is not None and not applies:
            raise StepError(f"{flag} applies to --method {'structured' if flag != '--scope' else 'unstructured'} only")
    if structured:
        args.target = args.target or "ffn"
        if args.target not in STRUCTURED_TARGETS:
            raise StepError(f"--target {args.target!r} is not known; choose from {', '.join(STRUCTURED_TARGETS)}")
        args.importance = args.importance or ("activation" if args.data_dir else "weight")
        if args.importance not in IMPORTANCE:
            raise StepError(f"--importance {args.importance!r} is not known; choose {' or '.join(IMPORTANCE)}")
        if args.importance == "activation" and not args.data_dir:
            raise StepError(f"--importance activation measures activations on training examples: pass --data-dir "
                            f"or set {' / '.join(DATA_ENV)}, or use --importance weight")
        if args.calibration_examples < 1:
            raise StepError(f"--calibration-examples must be at least 1, got {args.calibration_examples}")
    else:
        args.scope = args.scope or "global"
        if args.scope not in UNSTRUCTURED_SCOPES:
            raise StepError(f"--scope {args.scope!r} is not known; choose {' or '.join(UNSTRUCTURED_SCOPES)}")
    if args.recovery_steps < 0:
        raise StepError(f"--recovery-steps must be 0 (off) or more, got {args.recovery_steps}")
    if args.recovery_steps and not args.data_dir:
        raise StepError(f"--recovery-steps {args.recovery_steps} fine-tunes on the training split: pass --data-dir "
                        f"or set {' / '.join(DATA_ENV)}, or use --recovery-steps 0")
    if args.recovery_steps:  # TrainSettings and LoraSettings check their values
        recovery_settings(args)
        LoraSettings.from_args(args)
    check_data_limits(args)


def recovery_settings(args: argparse.Namespace) -> TrainSettings:
    warmup = args.warmup_steps if args.warmup_steps is not None else min(20, args.recovery_steps // 10)
    return TrainSettings(max_steps=args.recovery_steps, learning_rate=args.learning_rate, batch_size=args.batch_size,
                         warmup_steps=warmup, logging_steps=max(1, min(25, args.recovery_steps // 10)), seed=args.seed)


def architecture(config) -> dict:
    return {"d_ff": config.d_ff, "num_heads": config.num_heads, "d_kv": config.d_kv, "d_model": config.d_model,
            "num_layers": config.num_layers, "num_decoder_layers": config.num_decoder_layers}


def prune_whole_units(model, tokenizer, args: argparse.Namespace, train_rows: list[dict], remove: dict[str, int],
                      units: dict[str, int]) -> dict:
    """Structured pruning in place: rank the units, remove the lowest ones; returns the card's ``pruning`` entry."""
    calibration_rows = []
    if args.importance == "activation":
        calibration_rows = random.Random(args.seed).sample(train_rows, min(args.calibration_examples, len(train_rows)))
        calibration = encode_records(tokenizer, calibration_rows, args.max_source_length, args.max_target_length)
        scores = activation_scores(model, calibration.features)
    else:
        scores = weight_scores(model)
    chosen = choose_units(model, scores, remove)
    prune_structured(model, chosen)
    pruning = {"method": "structured", "amount": args.amount, "target": args.target, "importance": args.importance,
               "calibration_examples": len(calibration_rows), "removed_per_layer": remove,
               "removed_fraction": {kind: round(count / units[kind], 6) for kind, count in remove.items()}}
    if "heads" in chosen:
        pruning["removed_heads"] = chosen["heads"]
        pruning["head_choice"] = ("self-attention: one choice per stack (its layers share the first layer's relative "
                                  "position bias); cross-attention: per layer")
    return pruning


def recover(model, tokenizer, args: argparse.Namespace, train_rows: list[dict], lora: LoraSettings,
            training: TrainSettings, masks: dict | None):
    """A short LoRA fine-tune of the pruned model, merged; pruned weights (``masks``) are zeroed again after."""
    train = encode_records(tokenizer, train_rows, args.max_source_length, args.max_target_length)
    peft_model = attach_lora(model, lora)
    with tempfile.TemporaryDirectory(prefix="prune-recovery-") as scratch:
        result = train_seq2seq(peft_model, tokenizer, train, None, training, Path(scratch), label="recovery", resume=False)
    model = peft_model.merge_and_unload()
    if masks is not None:
        reapply_masks(model, masks)  # the merged LoRA update is dense; keep the pruned weights at zero
    return model, {"steps": result.steps, "seconds": result.seconds, "tokens_per_second": result.tokens_per_second,
                   "learning_rate": args.learning_rate, "batch_size": args.batch_size, "warmup_steps": training.warmup_steps,
                   "train_examples": len(train_rows), "lora": lora.card(), "merged": True,
                   "pruned_weights_zeroed_after_merge": masks is not None}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source_dir = require_path(args.model_dir, "--model-dir", *MODEL_ENV)
    output_dir = require_output_dir(args.output_dir, "--output-dir", args.overwrite, *OUTPUT_ENV)
    check_flags(args)
    lora = LoraSettings.from_args(args) if args.recovery_steps else None
    training = recovery_settings(args) if args.recovery_steps else None
    model_dir = check_model_dir(source_dir)  # the extracted folder when given one holding model.tar.gz
    config_dict = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    remove, units = {}, {}
    if args.method == "structured":  # from config.json: a bad amount fails before the model is loaded
        units = structured_units(config_dict, args.target)
        remove = check_structured_amount(config_dict, args.target, args.amount)
    data_dir = Path(args.data_dir) if args.data_dir else None
    train_rows = read_split(data_dir, "train")[: args.max_train_examples] if data_dir else []
    validation_rows = read_split(data_dir, "validation")[: args.max_validation_examples] if data_dir else []
    configure_runtime()

    from transformers import set_seed

    set_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(source_dir)  # errors then name the folder the user gave
    base_card = read_model_card(model_dir)
    before = {"parameters": count_parameters(model), "architecture": architecture(model.config),
              "size": weights_size(model_dir, args.compressed_size)}
    validation = (encode_records(tokenizer, validation_rows, args.max_source_length, args.max_target_length)
                  if validation_rows else None)
    losses = {"examples": len(validation_rows)} if validation else {}
    if validation:
        losses["before_pruning"] = round(evaluation_loss(model, tokenizer, validation), 4)

    started = time.perf_counter()
    if args.method == "structured":
        pruning, masks = prune_whole_units(model, tokenizer, args, train_rows, remove, units), None
    else:
        masks = prune_unstructured(model, args.amount, args.scope)
        pruning = {"method": "unstructured", "amount": args.amount, "scope": args.scope,
                   "layers": "q, k, v, o, wi*, wo of every block (not the embedding or LM head)"}
    pruning["seconds"] = round(time.perf_counter() - started, 2)
    print(f"pruned ({args.method}) in {pruning['seconds']:.1f} s")
    if validation:
        losses["after_pruning"] = round(evaluation_loss(model, tokenizer, validation), 4)
        print(f"validation loss: {losses['before_pruning']:.4f} before pruning → {losses['after_pruning']:.4f} after")

    recovery = {"steps": 0}
    if args.recovery_steps:
        model, recovery = recover(model, tokenizer, args, train_rows, lora, training, masks)
        if validation:
            losses["after_recovery"] = round(evaluation_loss(model, tokenizer, validation), 4)
            print(f"validation loss after {recovery['steps']} recovery steps: {losses['after_recovery']:.4f}")

    reached = sparsity(model, list(masks) if masks is not None else None)
    after_parameters = count_parameters(model)
    card = {
        "base_model": base_card.get("base_model", str(source_dir)),
        "base_model_card": base_card,
        "method": "prune",
        "pruning": pruning,
        "parameters_before": before["parameters"],
        "parameters_after": after_parameters,
        "nonzero_parameters": after_parameters - reached["zeros_overall"],
        "architecture_before": before["architecture"],
        "architecture_after": architecture(model.config),
        "sparsity": reached,
        "recovery": recovery,
        "validation_loss": losses or None,
        "seed": args.seed,
    }
    if args.method == "unstructured":
        card["note"] = HONESTY_NOTE
    with atomic_output_dir(output_dir, args.overwrite) as staging:
        save_model(model, tokenizer, staging, card)
        # The size is known once the weights are written: measure the files, then add it to the card.
        card["size"] = {"before": before["size"], "after": weights_size(staging, args.compressed_size)}
        write_model_card(staging, {**read_model_card(staging), "size": card["size"]})
    print(summary_line(card))
    return 0


def _mb(size: int) -> str:
    return f"{size / 1e6:.2f} MB"


def summary_line(card: dict) -> str:
    pruning, size = card["pruning"], card["size"]
    what = f"{pruning['method']} {pruning.get('target') or pruning.get('scope')}, amount {pruning['amount']}"
    before, after = card["parameters_before"], card["parameters_after"]
    line = f"pruned ({what}): parameters {before:,} → {after:,} ({100 * (after - before) / before:+.1f}%)"
    if pruning["method"] == "unstructured":
        line += (f", sparsity {100 * card['sparsity']['pruned_layers']:.2f}% of pruned layers / "
                 f"{100 * card['sparsity']['overall']:.2f}% overall")
    line += f", weights {_mb(size['before']['weights_bytes'])} → {_mb(size['after']['weights_bytes'])}"
    if "weights_gzip_bytes" in size["after"]:
        line += f" (gzip {_mb(size['before']['weights_gzip_bytes'])} → {_mb(size['after']['weights_gzip_bytes'])})"
    if card["recovery"]["steps"]:
        line += f", {card['recovery']['steps']} recovery steps"
    return line


if __name__ == "__main__":
    started = time.perf_counter()
    code = run_step(main)
    print(f"prune finished in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    sys.exit(code)
