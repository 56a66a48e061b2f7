"""Post-training quantization of a Flan-T5 model: ct2-int8 (CTranslate2), bf16 or fp16.

Methods:
  ct2-int8  the model converted to CTranslate2 with int8 weights: every Linear layer, the
            embeddings and the LM head (about 4x smaller than fp32), served by CTranslate2's
            int8 kernels and C++ decoding loop (4-5x faster than transformers' generate on
            fp32 at batch 1 on CPU; see stepkit/ctranslate.py). The folder keeps the Hugging
            Face config.json, generation config and tokenizer beside ctranslate2/ (model.bin,
            config.json, shared_vocabulary.json); stepkit.modeling.load_model_and_tokenizer
            loads it, and model.tar.gz packs the ctranslate2 wheel so that it serves without
            network access (stepkit/wheels.py).
  bf16      weights cast to bfloat16 (save_pretrained); about 2x smaller, fp32's exponent range.
  fp16      weights cast to float16 (save_pretrained). T5 overflows in fp16: prefer bf16.
The int8-dynamic and int8-static methods of earlier versions are retired: they ran on torch.ao
kernels that torch deprecates, kept embeddings and LM head in fp32 (1.5x smaller than fp32),
and were 4x slower than CTranslate2 int8 on the same model.

Writes to --output-dir: the model folder and model_card.json (method, sizes on disk
before/after, compression ratio, what was quantized, the runtime and its version).

Example:
  python steps/quantize.py --model-dir out/finetuned --method ct2-int8 --output-dir out/int8
  python steps/quantize.py --model-dir out/finetuned --method bf16 --output-dir out/bf16
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from stepkit.contract import atomic_output_dir, env_path, path_help, require_output_dir, require_path
from stepkit.ctranslate import METHODS as CT2_METHODS
from stepkit.ctranslate import RUNTIME_DIR
from stepkit.errors import StepError, run_step
from stepkit.modelcard import read_model_card, write_model_card
from stepkit.modelcheck import check_model_dir
from stepkit.modeling import count_parameters, load_model_and_tokenizer, save_model
from stepkit.threads import configure_runtime

MODEL_ENV = ("SM_CHANNEL_MODEL",)
DATA_ENV = ("SM_CHANNEL_DATA", "SM_CHANNEL_TRAIN")
OUTPUT_ENV = ("SM_MODEL_DIR", "SM_OUTPUT_DATA_DIR")
HALF_METHODS = ("bf16", "fp16")
METHODS = (*CT2_METHODS, *HALF_METHODS)
RETIRED = ("int8-dynamic", "int8-static")
COPIED_FILES = ("config.json", "generation_config.json")  # the Hugging Face files a ct2-int8 folder keeps
FP16_WARNING = ("T5 overflows in float16: feed-forward activations pass fp16's maximum (65,504) and turn into "
                "inf/NaN, on larger Flan-T5 sizes especially; transformers keeps wo in fp32 when loading fp16 T5, "
                "which helps but is no guarantee. Prefer bf16 (or ct2-int8) and evaluate the result before using it.")


def build_parser() -> argparse.ArgumentParser:
    """This script's flags (flanops checks a config's ``steps`` settings against them)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # --max-step must not pass for --max-steps
    parser.add_argument("--model-dir", default=env_path(*MODEL_ENV),
                        help=path_help("model folder to quantize (fine-tune, distill or prune output)", *MODEL_ENV))
    parser.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    parser.add_argument("--output-dir", default=env_path(*OUTPUT_ENV), help=path_help("where the quantized model goes", *OUTPUT_ENV))
    parser.add_argument("--data-dir", default=env_path(*DATA_ENV),
                        help=path_help("prepared splits (not needed by any current method; accepted so that the "
                                       "pipeline passes every optimize step the same inputs)", *DATA_ENV))
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_flags(args: argparse.Namespace) -> None:
    """Every setting that needs no file, checked before anything loads (flanops checks a config's with it too)."""
    if args.method in RETIRED:
        raise StepError(f"--method {args.method!r} was retired: it ran on torch.ao kernels that torch deprecates and "
                        "was 4x slower and 2.6x bigger than CTranslate2 int8; use --method ct2-int8")
    if args.method not in METHODS:
        raise StepError(f"--method {args.method!r}: unknown method; choose one of {', '.join(METHODS)}")


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
    if done or (model_dir / RUNTIME_DIR).is_dir():
        raise StepError(f"--model-dir {model_dir}: already quantized ({(done or {}).get('method', RUNTIME_DIR)}); "
                        "quantize the full-precision model it came from "
                        f"({card.get('source_model_dir', 'see its model_card.json')})")
    return model_dir, output_dir, card


def weights_bytes(folder: Path) -> int:
    """Bytes of the folder's weight files (tokenizer and config are the same before and after)."""
    files = [*folder.glob("*.safetensors"), *folder.glob("pytorch_model*.bin"), *folder.glob(f"{RUNTIME_DIR}/model.bin")]
    return sum(path.stat().st_size for path in files)


def cast(model, tokenizer, method: str, staging: Path, card: dict) -> dict:
    """bf16/fp16: every weight cast, written with save_pretrained; returns the card's quantization details."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[method]
    save_model(model.to(dtype), tokenizer, staging, card)
    name = str(dtype).removeprefix("torch.")
    details = {"method": method, "format": "save_pretrained", "dtype": name, "weights": f"every weight cast to {name}",
               "kept_in_full_precision": [], "runtime": "transformers",
               "note": "transformers upcasts wo to float32 when it loads float16 T5" if method == "fp16" else
                       "bfloat16 keeps float32's exponent range: no overflow, about 3 significant digits"}
    if method == "fp16":
        details["warning"] = FP16_WARNING
    return details


def convert_to_ctranslate2(model_dir: Path, source_dir: Path, method: str, tokenizer, staging: Path, card: dict) -> dict:
    """ct2-int8: CTranslate2's converter on the source folder; the Hugging Face files it needs are kept beside."""
    import ctranslate2

    from stepkit.ctranslate import convert

    convert(model_dir, staging, method, f"--model-dir {source_dir}")
    for name in COPIED_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, staging / name)
    tokenizer.save_pretrained(staging)
    details = {"method": method, "format": f"CTranslate2 {ctranslate2.__version__} ({RUNTIME_DIR}/model.bin)",
               "runtime": "ctranslate2", "runtime_version": ctranslate2.__version__,
               "weights": "int8, one scale per output row: every Linear layer, the embeddings and the LM head",
               "activations": "quantized per row at run time; layer norms and attention softmax in float32",
               "kept_in_full_precision": ["layer norms", "relative position biases"]}
    write_model_card(staging, {**card, "quantization": details})
    return details


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_dir, output_dir, base_card = check_args(args)
    configure_runtime()

    source_dir = Path(args.model_dir)  # as given: model_dir is where its model.tar.gz was extracted, if it held one
    model, tokenizer = load_model_and_tokenizer(source_dir)  # so that errors name the folder the user gave
    source_dtype = str(model.dtype).removeprefix("torch.")
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
        if args.method in HALF_METHODS:
            details = cast(model.float().eval(), tokenizer, args.method, staging, card)
        else:
            del model  # the converter loads its own copy
            details = convert_to_ctranslate2(model_dir, source_dir, args.method, tokenizer, staging, card)
        after = weights_bytes(staging)
        card.update({"quantization": details,
                     "size_on_disk_bytes": {"before": before, "after": after, "counts": "weight files only"},
                     "compression_ratio": round(before / after, 3),
                     "seconds": round(time.perf_counter() - started, 1)})
        write_model_card(staging, card)
    if after >= before:
        print(f"warning: the result is not smaller than the source ({source_dtype} weights, {before:,} bytes): "
              f"{args.method} only shrinks a float32 model")
    print(f"quantize {args.method}: weights {before:,} → {after:,} bytes ({before / after:.2f}x smaller), "
          f"{details['runtime']} runs it; wrote {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_step(main))
