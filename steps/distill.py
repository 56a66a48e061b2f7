"""Distil a fine-tuned Flan-T5 (the teacher) into a smaller student on the prepared splits.

The student learns from the reference summaries and from the teacher's output distribution
on them (teacher-forced): per target token,

    alpha * T² * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, reference)

The teacher is frozen. The student (--student):
  layers           default: the teacher shrunk, --student-encoder-fraction of its encoder blocks and
                   --student-decoder-fraction of its decoder blocks (at least 1 each; or
                   --student-encoder-layers/--student-decoder-layers), initialised by copying those
                   teacher blocks, first and last included (as DistilBART does), with the
                   embeddings and LM head; block 0 holds T5's relative position bias. Decoder
                   blocks run once per generated token, encoder blocks once per summary; the
                   default shape is the one measured at least 2x faster than its teacher on
                   Flan-T5 small and base (stepkit/distillation.py says how it was chosen)
  flan-t5-small    a catalog name: the pretrained model from the Hugging Face Hub
  ./folder         a model folder (e.g. select_model.py output)
A catalog or folder student must share the teacher's vocabulary (same tokenizer).

Writes to ``--output-dir`` (SageMaker's model dir, packed as model.tar.gz): the student model,
``training_curve.json`` (distillation loss per step, on validation per evaluation) and
``model_card.json`` (teacher, student architecture and kept layers, T, alpha, parameters,
validation loss and agreement with the teacher before and after).

Example:
  python steps/distill.py --teacher-dir out/finetuned --data-dir out/data --output-dir out/distilled \\
      --temperature 2 --alpha 0.5 --max-steps 300
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from stepkit import catalog
from stepkit.contract import atomic_output_dir, env_path, path_help, require_output_dir, require_path
from stepkit.distillation import (DEFAULT_DECODER_FRACTION, DEFAULT_ENCODER_FRACTION, check_same_vocabulary,
                                  check_settings, compare_to_teacher, distillation_loss_function, layers_to_keep,
                                  shrink_teacher, student_layer_count)
from stepkit.errors import StepError, first_line, run_step
from stepkit.modelcard import read_model_card
from stepkit.modelcheck import check_model_dir
from stepkit.modeling import count_parameters, load_model_and_tokenizer, save_model
from stepkit.records import read_split
from stepkit.threads import configure_runtime
from stepkit.training import (TrainSettings, add_training_arguments, encode_records, resolve_bf16, train_seq2seq,
                              train_settings, write_curve)

TEACHER_ENV = ("SM_CHANNEL_TEACHER", "SM_CHANNEL_MODEL")
DATA_ENV = ("SM_CHANNEL_DATA", "SM_CHANNEL_TRAIN")
OUTPUT_ENV = ("SM_MODEL_DIR",)
CURVE_FILE = "training_curve.json"
SHRUNK = "layers"


def build_parser() -> argparse.ArgumentParser:
    """This script's flags (flanops checks a config's ``steps`` settings against them)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # --max-step must not pass for --max-steps
    paths = parser.add_argument_group("paths")
    paths.add_argument("--teacher-dir", default=env_path(*TEACHER_ENV),
                       help=path_help("the fine-tuned (merged) model folder (finetune_lora.py output)", *TEACHER_ENV))
    paths.add_argument("--data-dir", default=env_path(*DATA_ENV), help=path_help("prepared splits (prepare_data.py output)", *DATA_ENV))
    paths.add_argument("--output-dir", default=env_path(*OUTPUT_ENV), help=path_help("where the student model goes", *OUTPUT_ENV))
    paths.add_argument("--checkpoint-dir", help="checkpoints, resumed from when present (SageMaker: /opt/ml/checkpoints); "
                                                "default: a temporary folder, no resume")
    paths.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    student = parser.add_argument_group("student")
    student.add_argument("--student", default=SHRUNK,
                         help=f"'{SHRUNK}' (the teacher shrunk), a catalog name (flan-t5-small) or a model folder "
                              f"sharing the teacher's tokenizer (default: {SHRUNK})")
    student.add_argument("--student-revision", default="main",
                         help="Hub revision of a catalog --student: a commit sha pins exactly those weights (default: main)")
    student.add_argument("--student-encoder-fraction", type=float, default=DEFAULT_ENCODER_FRACTION,
                         help="share of the teacher's encoder blocks the shrunk student keeps "
                              f"(default: {DEFAULT_ENCODER_FRACTION:g})")
    student.add_argument("--student-decoder-fraction", type=float, default=DEFAULT_DECODER_FRACTION,
                         help="share of the teacher's decoder blocks the shrunk student keeps "
                              f"(default: {DEFAULT_DECODER_FRACTION:g})")
    student.add_argument("--student-encoder-layers", type=int, help="encoder blocks to keep (overrides the fraction)")
    student.add_argument("--student-decoder-layers", type=int, help="decoder blocks to keep (overrides the fraction)")
    loss = parser.add_argument_group("distillation loss")
    loss.add_argument("--temperature", type=float, default=2.0, help="softmax temperature T > 0 for the KL term (default: 2.0)")
    loss.add_argument("--alpha", type=float, default=0.5,
                      help="weight of the distillation (KL) term in [0, 1]; 1 - alpha weighs the reference CE (default: 0.5)")
    train = parser.add_argument_group("training")
    add_training_arguments(train)
    train.add_argument("--max-validation-examples", type=int,
                       help="measure loss and agreement on only the first N validation examples (quick runs)")
    train.add_argument("--seed", type=int, default=0)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_flags(args: argparse.Namespace) -> TrainSettings:
    """Every setting that needs no file, checked before anything loads (flanops checks a config's with it too)."""
    check_settings(args.temperature, args.alpha)
    for flag in ("encoder", "decoder"):
        fraction = getattr(args, f"student_{flag}_fraction")
        if not 0 < fraction <= 1:
            raise StepError(f"--student-{flag}-fraction must be in (0, 1], got {fraction}")
    return train_settings(args)


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))  # check_model_dir validated it


def plan_student(args: argparse.Namespace, teacher_config: dict) -> dict:
    """What --student names, checked without loading any weights (so mistakes cost seconds)."""
    spec = args.student.strip()
    teacher_vocab = teacher_config["vocab_size"]
    if spec == SHRUNK:
        encoder_total = teacher_config["num_layers"]
        decoder_total = teacher_config.get("num_decoder_layers") or encoder_total
        encoder = student_layer_count(encoder_total, args.student_encoder_fraction, args.student_encoder_layers,
                                      "--student-encoder-layers")
        decoder = student_layer_count(decoder_total, args.student_decoder_fraction, args.student_decoder_layers,
                                      "--student-decoder-layers")
        return {"kind": "shrunk", "encoder_layers": layers_to_keep(encoder_total, encoder),
                "decoder_layers": layers_to_keep(decoder_total, decoder)}
    if args.student_encoder_layers is not None or args.student_decoder_layers is not None:
        raise StepError(f"--student-encoder-layers/--student-decoder-layers shrink the teacher; "
                        f"they do not apply to --student {spec}")
    entry = catalog.lookup(spec)
    if entry is catalog.TINY:
        raise StepError("--student tiny: the tiny model is built from data by select_model.py and has its own "
                        "tokenizer; use the default student (the teacher shrunk) instead")
    if entry is not None:
        check_same_vocabulary(None, None, teacher_vocab, entry.dims.vocab_size, f"--student {spec}")
        return {"kind": "catalog", "entry": entry, "revision": args.student_revision}
    path = Path(spec)
    if not path.exists():
        known = ", ".join(e.name for e in catalog.FAMILY)
        raise StepError(f"--student {spec}: not '{SHRUNK}', a catalog name ({known}) or an existing model folder")
    folder = check_model_dir(path, "--student")  # differs from path when path holds model.tar.gz
    check_same_vocabulary(None, None, teacher_vocab, read_config(folder).get("vocab_size"), f"--student {path}")
    return {"kind": "folder", "folder": folder, "given": path}


def load_student(plan: dict, teacher, teacher_tokenizer):
    """(student model, its tokenizer, what the card says about where it came from)."""
    if plan["kind"] == "shrunk":
        student = shrink_teacher(teacher, plan["encoder_layers"], plan["decoder_layers"])
        return student, teacher_tokenizer, {
            "source": "teacher shrunk",
            "layers_kept": {"encoder": plan["encoder_layers"], "decoder": plan["decoder_layers"]},
            "initialised_from": "the teacher's blocks listed in layers_kept, its embeddings and LM head"}
    if plan["kind"] == "catalog":
        entry = plan["entry"]
        student, tokenizer = download_from_hub(entry.hub_id, plan["revision"])
        where = {"source": entry.hub_id, "initialised_from": f"pretrained {entry.hub_id}"}
        label = f"--student {entry.name}"
    else:
        student, tokenizer = load_model_and_tokenizer(plan["given"], flag="--student")
        where = {"source": str(plan["given"]), "source_card": read_model_card(plan["folder"]),
                 "initialised_from": f"the model in {plan['given']}"}
        label = f"--student {plan['given']}"
    check_same_vocabulary(teacher_tokenizer, tokenizer, teacher.config.vocab_size, student.config.vocab_size, label)
    return student.to(teacher.dtype), tokenizer, where


def download_from_hub(hub_id: str, revision: str):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    print(f"downloading the student {hub_id} at revision {revision} from the Hugging Face Hub")
    try:
        return (AutoModelForSeq2SeqLM.from_pretrained(hub_id, revision=revision),
                AutoTokenizer.from_pretrained(hub_id, revision=revision))
    except OSError as err:
        raise StepError(f"--student {hub_id}: cannot download it ({first_line(err)}); offline, use the default "
                        "student (the teacher shrunk) or a local model folder") from None


def architecture(model) -> dict:
    return {"model_type": model.config.model_type, **catalog.dims_of_model(model).as_dict()}


def rounded(figures: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = check_flags(args)
    teacher_source = require_path(args.teacher_dir, "--teacher-dir", *TEACHER_ENV)
    teacher_dir = check_model_dir(teacher_source, "--teacher-dir")  # where its model.tar.gz was extracted, if it held one
    data_dir = require_path(args.data_dir, "--data-dir", *DATA_ENV)
    output_dir = require_output_dir(args.output_dir, "--output-dir", args.overwrite, *OUTPUT_ENV)
    plan = plan_student(args, read_config(teacher_dir))
    train_rows = read_split(data_dir, "train")[: args.max_train_examples]
    validation_rows = read_split(data_dir, "validation")[: args.max_validation_examples]
    with atomic_output_dir(output_dir, args.overwrite) as staging:  # a full --output-dir fails now, not after training
        configure_runtime()
        from transformers import set_seed

        set_seed(args.seed)
        teacher, tokenizer = load_model_and_tokenizer(teacher_source, flag="--teacher-dir")
        student, student_tokenizer, origin = load_student(plan, teacher, tokenizer)
        teacher_params, student_params = count_parameters(teacher), count_parameters(student)
        print(f"teacher {teacher_params:,} parameters; student {student_params:,} "
              f"({100 * student_params / teacher_params:.0f}%)"
              + (f", teacher layers kept: {origin['layers_kept']}" if "layers_kept" in origin else ""))
        if student_params >= teacher_params:
            print(f"warning: the student is not smaller than the teacher ({student_params:,} ≥ {teacher_params:,} parameters)")

        train = encode_records(tokenizer, train_rows, args.max_source_length, args.max_target_length)
        validation = encode_records(tokenizer, validation_rows, args.max_source_length, args.max_target_length)
        for name, data, rows in (("train", train, train_rows), ("validation", validation, validation_rows)):
            if data.truncated_sources or data.truncated_targets:
                print(f"warning: {name}: {data.truncated_sources} of {len(rows)} prompts cut to --max-source-length "
                      f"{args.max_source_length}, {data.truncated_targets} summaries cut to --max-target-length "
                      f"{args.max_target_length}")
        before = compare_to_teacher(student, teacher, tokenizer, validation)
        print(f"before distillation: validation loss {before['student_loss']:.4f} (teacher {before['teacher_loss']:.4f}), "
              f"KL to teacher {before['kl']:.4f}, token agreement {before['token_agreement']:.1%}")
        loss_function = distillation_loss_function(teacher, args.temperature, args.alpha)
        with tempfile.TemporaryDirectory(prefix="distill-checkpoints-") as scratch:
            checkpoints = Path(args.checkpoint_dir) if args.checkpoint_dir else Path(scratch)
            try:
                checkpoints.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise StepError(f"--checkpoint-dir {checkpoints}: cannot create it ({err.strerror})") from None
            result = train_seq2seq(student, tokenizer, train, validation, settings, checkpoints, label="distill",
                                   resume=bool(args.checkpoint_dir), compute_loss=loss_function)
        after = compare_to_teacher(student, teacher, tokenizer, validation)
        print(f"after {result.steps} steps ({result.seconds:.0f} s, {result.tokens_per_second:,.0f} tokens/s): "
              f"validation loss {before['student_loss']:.4f} → {after['student_loss']:.4f} "
              f"(teacher {after['teacher_loss']:.4f}), KL to teacher {before['kl']:.4f} → {after['kl']:.4f}, "
              f"token agreement {before['token_agreement']:.1%} → {after['token_agreement']:.1%}")

        teacher_card = read_model_card(teacher_dir)
        card = {
            "base_model": teacher_card.get("base_model", str(teacher_source)),
            "method": "distillation",
            "teacher": {"dir": str(teacher_source), "method": teacher_card.get("method"), "parameters": teacher_params,
                        "architecture": architecture(teacher)},
            "teacher_card": teacher_card,
            "student": {**origin, "parameters": student_params, "architecture": architecture(student)},
            "parameters_vs_teacher": round(student_params / teacher_params, 4),
            "distillation": {"temperature": args.temperature, "alpha": args.alpha,
                             "loss": "alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) "
                                     "+ (1 - alpha) * CE(student, reference), mean over target tokens"},
            "training": {"steps": result.steps, "seconds": result.seconds, "tokens_per_second": result.tokens_per_second,
                         "stopped_early": result.stopped_early, "learning_rate": args.learning_rate,
                         "batch_size": args.batch_size, "train_examples": len(train_rows), "seed": args.seed,
                         "precision": "bf16" if resolve_bf16(settings.precision) else "fp32"},
            "validation_loss": {"before": round(before["student_loss"], 4), "after": round(after["student_loss"], 4),
                                "teacher": round(after["teacher_loss"], 4),
                                "best_distillation_loss_during_training": result.best_eval_loss},
            "agreement_with_teacher": {
                "measure": "teacher-forced on the validation references: kl = mean KL(teacher || student) per "
                           "target token at T=1 (nats), token_agreement = share of positions with the same top token",
                "before": rounded({k: before[k] for k in ("kl", "token_agreement")}),
                "after": rounded({k: after[k] for k in ("kl", "token_agreement")}),
                "validation_examples": len(validation_rows), "validation_tokens": after["tokens"]},
            "truncated": {"train_sources": train.truncated_sources, "train_targets": train.truncated_targets},
        }
        save_model(student, student_tokenizer, staging, card)
        write_curve(staging / CURVE_FILE, result, label="distill", loss="distillation", temperature=args.temperature,
                    alpha=args.alpha, before=rounded(before), after=rounded(after))
    print(f"wrote the student model and {CURVE_FILE} to {output_dir}")
    return 0


if __name__ == "__main__":
    started = time.perf_counter()
    code = run_step(main)
    print(f"distill finished in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    sys.exit(code)
