"""Post-training quantization of a Flan-T5 model: fp16, bf16, int8-dynamic or int8-static.

Methods (details and the int8 file format: stepkit/quantization.py):
  fp16          weights cast to float16 (save_pretrained). T5 overflows in fp16: prefer bf16.
  bf16          weights cast to bfloat16 (save_pretrained).
  int8-dynamic  Linear weights int8, inputs quantized on the fly, int8 GEMM kernels on CPU.
  int8-static   as int8-dynamic, with each Linear's input range fixed by a calibration pass
                over --calibration-size training prompts (needs --data-dir).
The int8 methods keep the FFN output projections (wo), embeddings, lm_head and layer norms in
fp32. Their weights go to quantized_model.safetensors, which stepkit.modeling's
load_model_and_tokenizer reads (evaluate.py loads models through it); transformers'
from_pretrained does not. The int8 kernels are torch's x86 ones (fbgemm); tested on x86 only.

Writes to --output-dir: the model folder (weights, config, tokenizer) and model_card.json
(method, sizes on disk before/after, compression ratio, what stayed fp32, calibration).

Example:
  python steps/quantize.py --model-dir out/finetuned --method int8-dynamic --output-dir out/int8
  python steps/quantize.py --model-dir out/finetuned --method int8-static --data-dir out/data --output-dir out/int8s
"""
from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from pathlib import Path

from stepkit.contract import atomic_output_dir, env_path, path_help, require_output_dir, require_path
from stepkit.errors import StepError, run_step
from stepkit.modeling import (check_model_dir, configure_runtime, count_parameters, load_model_and_tokenizer,
                              read_model_card, save_model, write_model_card)
from stepkit.records import read_split

MODEL_ENV = ("SM_CHANNEL_MODEL",)
DATA_ENV = ("SM_CHANNEL_DATA", "SM_CHANNEL_TRAIN")
OUTPUT_ENV = ("SM_MODEL_DIR", "SM_OUTPUT_DATA_DIR")
METHODS = ("fp16", "bf16", "int8-dynamic", "int8-static")  # = stepkit.quantization.METHODS (that module imports torch)
FP16_WARNING = ("T5 overflows in float16: feed-forward activations pass fp16's maximum (65,504) and turn into "
                "inf/NaN, on larger Flan-T5 sizes especially; transformers keeps wo in fp32 when loading fp16 T5, "
                "which helps but is no guarantee. Prefer bf16 (or int8) and evaluate the result before using it.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=env_path(*MODEL_ENV),
                        help=path_help("model folder to quantize (fine-tune, distill or prune output)", *MODEL_ENV))
    parser.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    parser.add_argument("--output-dir", default=env_path(*OUTPUT_ENV), help=path_help("where the quantized model goes", *OUTPUT_ENV))
    parser.add_argument("--data-dir", default=env_path(*DATA_ENV),
                        help=path_help("prepared splits; int8-static calibrates on the train split", *DATA_ENV))
    parser.add_argument("--calibration-size", type=int, default=64,
                        help="int8-static: training examples in the calibration pass, sampled with --seed (default: 64)")
    parser.add_argument("--max-source-length", type=int, default=512, help="calibration prompt tokens kept (default: 512)")
    parser.add_argument("--seed", type=int, default=0, help="calibration sample seed (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    return parser.parse_args(argv)


def check_flags(args: argparse.Namespace) -> None:
    """Every setting that needs no file, checked before anything loads (flanops checks a config's with it too)."""
    if args.method not in METHODS:
        raise StepError(f"--method {args.method!r}: unknown method; choose one of {', '.join(METHODS)}")
    if args.method == "int8-static":
        if args.calibration_size < 1:
            raise StepError(f"--calibration-size must be at least 1, got {args.calibration_size}")
        if not args.data_dir:
            raise StepError("--method int8-static calibrates on training data: pass --data-dir (the prepare_data.py "
                            f"output) or set {' / '.join(DATA_ENV)}")
    if args.max_source_length < 8:
        raise StepError(f"--max-source-length must be at least 8, got {args.max_source_length}")


def check_args(args: argparse.Namespace) -> tuple[Path, Path, dict]:
    """Everything that can be checked without loading the model; returns (model dir, output dir, its card)."""
    check_flags(args)
    source_dir = require_path(args.model_dir, "--model-dir", *MODEL_ENV)
    model_dir = check_model_dir(source_dir)  # the extracted folder when given one holding model.tar.gz
    output_dir = require_output_dir(args.output_dir, "--output-dir", args.overwrite, *OUTPUT_ENV)
    if output_dir.absolute() == source_dir.absolute():
        raise StepError(f"--output-dir {output_dir} is the --model-dir; write the quantized model to another folder")
    card = read_model_card(model_dir)
    done = card.get("quantization")
    if done:
        raise StepError(f"--model-dir {model_dir}: already quantized ({done.get('method')}); quantize the "
                        f"full-precision model it came from ({card.get('source_model_dir', 'see its model_card.json')})")
    return model_dir, output_dir, card


def weights_bytes(folder: Path) -> int:
    """Bytes of the folder's weight files (tokenizer and config are the same before and after)."""
    files = [*folder.glob("*.safetensors"), *folder.glob("pytorch_model*.bin")]
    return sum(path.stat().st_size for path in files)


def calibration_batches(tokenizer, rows: list[dict], size: int, seed: int, max_source_length: int):
    """``size`` training examples (seeded sample) as teacher-forced batches of one: no padding to observe."""
    import torch

    from stepkit.training import encode_records

    sample = rows if size >= len(rows) else random.Random(seed).sample(rows, size)
    encoded = encode_records(tokenizer, sample, max_source_length, max_target_length=128)
    batches = [{name: torch.tensor([feature[name]]) for name in ("input_ids", "attention_mask", "labels")}
               for feature in encoded.features]
    info = {"split": "train", "examples": len(sample), "available": len(rows), "seed": seed,
            "source_tokens": sum(len(f["input_ids"]) for f in encoded.features),
            "target_tokens": sum(len(f["labels"]) for f in encoded.features),
            "decoder": "teacher-forced on the reference summary",
            "observer": "HistogramObserver (torch.ao), per tensor, uint8",
            "truncated_prompts": encoded.truncated_sources}
    return batches, info


def check_round_trip(model, folder: Path) -> None:
    """The written folder, loaded as a user would, must give exactly the in-memory model's logits."""
    import torch

    from stepkit.quantization import load_quantized

    reloaded, _ = load_quantized(folder)
    vocab = model.config.vocab_size
    input_ids = torch.arange(3, 19).reshape(1, -1) % vocab  # any ids: the check compares two models, not quality
    decoder_input_ids = torch.tensor([[model.config.decoder_start_token_id, 5 % vocab, 7 % vocab]])
    with torch.inference_mode():
        expected = model(input_ids=input_ids, decoder_input_ids=decoder_input_ids).logits
        actual = reloaded(input_ids=input_ids, decoder_input_ids=decoder_input_ids).logits
    if not torch.equal(expected, actual):
        raise RuntimeError(f"bug: the saved model's logits differ from the quantized model's by up to "
                           f"{(expected - actual).abs().max().item():.3g}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_dir, output_dir, base_card = check_args(args)
    train_rows = read_split(args.data_dir, "train") if args.method == "int8-static" else None
    configure_runtime()

    import torch

    from stepkit import quantization

    source_dir = Path(args.model_dir)  # as given: model_dir is where its model.tar.gz was extracted, if it held one
    model, tokenizer = load_model_and_tokenizer(source_dir)  # so that errors name the folder the user gave
    source_dtype = str(model.dtype).removeprefix("torch.")
    model = model.float().eval()  # int8 kernels take fp32 input; a bf16 source is upcast first
    parameters = count_parameters(model)
    before = weights_bytes(model_dir)
    card = {
        "base_model": base_card.get("base_model", str(source_dir)),
        "base_model_card": base_card,
        "method": "quantize",
        "step": "quantize",
        "source_model_dir": str(source_dir),
        "source_method": base_card.get("method"),
        "source_dtype": source_dtype,
        "parameters": parameters,
    }
    if args.method == "fp16":
        print(f"warning: {FP16_WARNING}")
    started = time.perf_counter()
    with atomic_output_dir(output_dir, args.overwrite) as staging:
        if args.method in quantization.HALF_METHODS:
            dtype = quantization.HALF_METHODS[args.method]
            model = model.to(dtype)
            details = {"method": args.method, "format": "save_pretrained", "dtype": str(dtype).removeprefix("torch."),
                       "weights": f"every weight cast to {str(dtype).removeprefix('torch.')}",
                       "kept_in_full_precision": [],
                       "note": "transformers upcasts wo to float32 when it loads float16 T5" if args.method == "fp16" else
                               "bfloat16 keeps float32's exponent range: no overflow, about 3 significant digits"}
            if args.method == "fp16":
                details["warning"] = FP16_WARNING
            save_model(model, tokenizer, staging, card)  # the card is completed below
        else:
            calibration = None
            if args.method == "int8-dynamic":
                names = quantization.quantize_dynamic(model)
            else:
                batches, calibration = calibration_batches(tokenizer, train_rows, args.calibration_size, args.seed,
                                                           args.max_source_length)
                if calibration["examples"] < args.calibration_size:
                    print(f"warning: the train split has {calibration['examples']} examples, fewer than "
                          f"--calibration-size {args.calibration_size}; calibrating on all of them")
                calibration["data_dir"] = str(args.data_dir)
                names = quantization.quantize_static(model, batches)
            kept = quantization.kept_in_full_precision(model, names)
            quantization.save_int8(model, staging, args.method)
            for name in quantization.COPIED_FILES:
                if (model_dir / name).is_file():
                    shutil.copyfile(model_dir / name, staging / name)
            tokenizer.save_pretrained(staging)
            details = {
                "method": args.method,
                "format": f"{quantization.FORMAT} version {quantization.FORMAT_VERSION}",
                "weights_file": quantization.WEIGHTS_FILE,
                "loader": "stepkit.modeling.load_model_and_tokenizer (stepkit.quantization.load_int8_model); "
                          "not transformers' from_pretrained",
                "weights": "int8, symmetric, one scale per output channel",
                "activations": ("quantized per call from the input's min/max (dynamic)" if args.method == "int8-dynamic"
                                else "quantized with a calibrated scale and zero point per Linear input (static)"),
                "kernels": ("torch.ops.quantized.linear_dynamic" if args.method == "int8-dynamic" else
                            "torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32")
                           + f" (engine {torch.backends.quantized.engine})",
                "quantized_linear_layers": len(names),
                "quantized_parameters": sum(model.get_submodule(n).in_features * model.get_submodule(n).out_features
                                            for n in names),
                "kept_in_full_precision": kept,
                "kept_reason": "wo (FFN output) receives T5's largest activations; embeddings, lm_head, layer norms "
                               "and position biases are small or sensitive and stay as they were",
                "calibration": calibration,
            }
            write_model_card(staging, {**card, "quantization": details})
            check_round_trip(model, staging)
        after = weights_bytes(staging)
        card.update({"quantization": details,
                     "size_on_disk_bytes": {"before": before, "after": after, "counts": "weight files only"},
                     "compression_ratio": round(before / after, 3),
                     "seconds": round(time.perf_counter() - started, 1)})
        write_model_card(staging, card)
    if after >= before:
        print(f"warning: the result is not smaller than the source ({source_dtype} weights, {before:,} bytes): "
              f"{args.method} only shrinks a float32 model")
    kept = quantization.short_names(details["kept_in_full_precision"])
    print(f"quantize {args.method}: weights {before:,} → {after:,} bytes ({before / after:.2f}x smaller); "
          f"kept in full precision: {', '.join(kept) or 'nothing'}; wrote {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_step(main))
