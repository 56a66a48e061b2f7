"""Score a candidate model against a baseline on the same test split with the same generation settings.

Quality: ROUGE-1/2/L/Lsum (best over references per example), the best constant output (one
training summary given for every input: what the template alone earns), repetition (the share of
summaries that loop, "discussssss" or "at 2 pm at 2 pm at 2 pm", where no reference does) and,
where the data records its facts (synthetic), how often the speakers and slot values in the
summary are right (``facts_recorded`` says which: 1 or 0).
Cost: parameters, size on disk, compression ratio vs the baseline, FLOPs per generated token,
latency p50/p95 at batch 1 and throughput at a larger batch, on the same inputs, after warm-up;
every model is timed side by side in the same rounds, and ``latency_ratio`` (its batch-1
latency over the baseline's on the same input in the same round, the median) is a figure the
machine's load does not move: the gate's ``MaxLatencyRatio`` reads it.

Writes to ``--output-dir``: ``evaluation.json`` (read by the pipeline's gate through a
PropertyFile: ``metrics.<name>.value``), ``model_quality.json`` (the Model Registry's
ModelQuality statistics document) and ``predictions.jsonl`` (dialogue, references and every
model's prediction) so a person can read what the models do. ``--compare NAME=DIR`` adds
more models (e.g. each optimized variant) to the same table and files; a DIR holding
SKIPPED.json (an optimization branch that was not chosen, see optimize.py) is dropped with a
note and listed under ``skipped``. Any model folder may instead hold SageMaker's model.tar.gz.

Choosing the variant to register (--select-within-drop X): the candidates are the --model-dir
model (named "finetuned") and every --compare model; those whose ROUGE-L is at most X below
the fine-tuned model's are eligible (X is a fraction, as ROUGE is in evaluation.json: 0.05 =
5 points) if they also lose at most --select-max-fact-drop of the fine-tuned model's share of
summaries with every fact right (where the data records facts) and repeat themselves in at most
--select-max-repetition of their summaries; the one with the lowest p95 latency at batch 1 wins
(ties: smaller weights). evaluation.json then gets ``selection`` (every candidate and why it won
or lost) and ``selected_variant``, and its top-level ``metrics`` and model_quality.json describe
the winner, with ``metrics.rougeL_drop`` and ``metrics.facts_all_right_drop`` (the fine-tuned
model's figure minus the winner's). Without the flag they describe the --model-dir model.

--package-dir writes the winner (without selection: the --model-dir model) as model.tar.gz
(SageMaker's layout, reproducible bytes) for the Model Registry; evaluation.json's ``package``
says which model it holds.

Example:
  python steps/evaluate.py --model-dir out/finetuned --baseline-dir out/model --data-dir out/data \\
      --output-dir out/evaluation --compare int8=out/int8 --compare pruned=out/pruned \\
      --select-within-drop 0.02 --package-dir out/package
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from stepkit.archive import MODEL_ARCHIVE
from stepkit.contract import (atomic_output_dir, env_path, path_help, require_output_dir, require_path,
                              skipped_reason)
from stepkit.cost import CostSettings, flops_per_generated_token, measure_speed, settings_dict, size_on_disk
from stepkit.errors import StepError, run_step
from stepkit.generation import summarize
from stepkit.metrics import ROUGE_TYPES, best_constant_output, fact_accuracy, repetition, rouge, rouge_per_example
from stepkit.modelcard import read_model_card
from stepkit.modelcheck import check_model_dir
from stepkit.modeling import count_parameters, load_model_and_tokenizer
from stepkit.packaging import package_model
from stepkit.records import read_split, write_jsonl
from stepkit.selection import FACTS_RECORDED, gate_metrics, print_selection, select_variant
from stepkit.threads import configure_runtime
from stepkit.wheels import DEFAULT_SERVING_PYTHON, NO_WHEEL_FLAG, check_python_version

MODEL_ENV = ("SM_CHANNEL_MODEL",)
BASELINE_ENV = ("SM_CHANNEL_BASELINE",)
DATA_ENV = ("SM_CHANNEL_DATA", "SM_CHANNEL_TEST")
OUTPUT_ENV = ("SM_OUTPUT_DATA_DIR",)
EVALUATION_FILE = "evaluation.json"
MODEL_QUALITY_FILE = "model_quality.json"
PREDICTIONS_FILE = "predictions.jsonl"
FINETUNED = "finetuned"  # the --model-dir model's name among the selection's candidates


def build_parser() -> argparse.ArgumentParser:
    """This script's flags (flanops checks a config's ``steps`` settings against them)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # --max-step must not pass for --max-steps
    parser.add_argument("--model-dir", default=env_path(*MODEL_ENV), help=path_help("candidate model folder", *MODEL_ENV))
    parser.add_argument("--baseline-dir", default=env_path(*BASELINE_ENV),
                        help=path_help("baseline model folder, e.g. the un-tuned foundation model", *BASELINE_ENV))
    parser.add_argument("--data-dir", default=env_path(*DATA_ENV), help=path_help("prepared splits", *DATA_ENV))
    parser.add_argument("--output-dir", default=env_path(*OUTPUT_ENV), help=path_help("where results go", *OUTPUT_ENV))
    parser.add_argument("--split", default="test", choices=("test", "validation"), help="split to score (default: test)")
    parser.add_argument("--max-examples", type=int, help="score only the first N examples (quick runs)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="generation length limit (default: 64)")
    parser.add_argument("--num-beams", type=int, default=1, help="beam search width; 1 is greedy (default: 1)")
    parser.add_argument("--batch-size", type=int, default=32, help="generation batch size (default: 32)")
    parser.add_argument("--max-source-length", type=int, default=512, help="prompt tokens kept (default: 512)")
    parser.add_argument("--constant-candidates", type=int, default=100,
                        help="distinct training summaries tried for the best constant output (default: 100)")
    parser.add_argument("--compare", action="append", default=[], metavar="NAME=DIR",
                        help="another model to score beside the candidate, e.g. an optimized variant (repeatable); "
                             "a DIR holding SKIPPED.json is dropped with a note")
    choose = parser.add_argument_group("choosing the model to register")
    choose.add_argument("--select-within-drop", type=float, metavar="X",
                        help="choose among the --model-dir model and the --compare models: ROUGE-L at most X below "
                             "the --model-dir model's (a fraction, e.g. 0.05), then the lowest p95 latency")
    choose.add_argument("--select-max-fact-drop", type=float, default=1.0, metavar="X",
                        help="with --select-within-drop: a model is eligible only if its share of summaries with every "
                             "fact right is at most X below the --model-dir model's, where the data records facts "
                             "(a fraction; default: 1, no bound)")
    choose.add_argument("--select-max-repetition", type=float, default=1.0, metavar="X",
                        help="with --select-within-drop: a model is eligible only if at most this share of its summaries "
                             "repeat themselves where no reference does (a fraction; default: 1, no bound)")
    choose.add_argument("--package-dir",
                        help="write the chosen model (without --select-within-drop: the --model-dir model) there as "
                             f"{MODEL_ARCHIVE}, for the Model Registry")
    choose.add_argument("--serving-python", default=DEFAULT_SERVING_PYTHON,
                        help="Python of the image that will serve the package: a CTranslate2 model ships its runtime's "
                             f"wheel for it (default: {DEFAULT_SERVING_PYTHON}, the registered image's)")
    choose.add_argument("--wheelhouse", help="folder holding that wheel (the pipeline stages it); default: the cache, "
                                             "else downloaded once from the package index")
    choose.add_argument(NO_WHEEL_FLAG, action="store_true",
                        help="package a CTranslate2 model without its runtime's wheel: the endpoint installs it from "
                             "the package index when it starts, so it needs network access")
    cost = parser.add_argument_group("cost measurement")
    cost.add_argument("--speed-inputs", type=int, default=8, help="distinct inputs timed at batch 1 (default: 8)")
    cost.add_argument("--speed-repeats", type=int, default=3, help="timings per input (default: 3)")
    cost.add_argument("--speed-new-tokens", type=int, default=32, help="tokens generated per timed input, the same for "
                                                                       "every model (default: 32)")
    cost.add_argument("--throughput-batch", type=int, default=8, help="batch size for throughput (default: 8)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir (and --package-dir)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def parse_compare(specs: list[str]) -> list[tuple[str, Path]]:
    models = []
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise StepError(f"--compare {spec!r}: expected NAME=DIR, e.g. --compare int8=out/int8")
        if name.strip() in ("model", "baseline", FINETUNED) or name.strip() in (n for n, _ in models):
            raise StepError(f"--compare {spec!r}: the name {name.strip()!r} is taken; give each model its own name")
        models.append((name.strip(), Path(folder.strip())))
    return models


def score(predictions: list[str], rows: list[dict]) -> dict:
    facts = fact_accuracy(predictions, [row.get("facts") for row in rows])
    references = [row["references"] for row in rows]
    return {"rouge": rouge(predictions, references), "facts": facts, "repetition": repetition(predictions, references)}


def load_and_score(name: str, folder: Path, flag: str, rows: list[dict], generation: dict) -> dict:
    """One model folder loaded and scored on ``rows``; the loaded model stays in the result for timing."""
    loaded_from = check_model_dir(folder, flag)  # where a model.tar.gz in folder was extracted (once), else folder
    model, tokenizer = load_model_and_tokenizer(folder, flag)
    threads = configure_runtime(count_parameters(model))
    print(f"{name}: generating {len(rows)} summaries with {folder} ({threads} thread{'s' * (threads > 1)})")
    predictions = summarize(model, tokenizer, [row["dialogue"] for row in rows], progress=progress_printer(name),
                            **generation)
    return {"model_dir": str(folder), "loaded_from": loaded_from, "card": read_model_card(loaded_from),
            "predictions": predictions, **score(predictions, rows), "loaded": (model, tokenizer)}


def progress_printer(label: str):
    """``progress(done, total)`` for summarize: summaries done, rate and time left."""
    started = time.perf_counter()

    def report(done: int, total: int) -> None:
        elapsed = max(time.perf_counter() - started, 1e-9)
        rate = done / elapsed
        print(f"{label}: {done}/{total} summaries ({rate:.1f}/s, {(total - done) / rate:.0f} s left)")
    return report


def measure_costs(results: dict[str, dict], rows: list[dict], cost_settings: CostSettings) -> None:
    """Size, parameters, FLOPs, and latency/throughput of every model side by side (``results[...]["cost"]``).

    Every model is timed in the same rounds (see stepkit.cost.measure_speed): PyTorch ones on the threads
    stepkit.threads gives the largest of them, CTranslate2 ones on their own; ``latency_ratio`` is each
    one's batch-1 latency over the baseline's.
    """
    dialogues = [row["dialogue"] for row in rows]
    loaded = {name: result["loaded"] for name, result in results.items()}
    configure_runtime(max(count_parameters(model) for model, _ in loaded.values()))
    print(f"timing {len(loaded)} models side by side: {cost_settings.latency_inputs} inputs x {cost_settings.repeats} "
          f"rounds at batch 1 and a batch of {cost_settings.throughput_batch}, {cost_settings.new_tokens} new tokens each")
    speeds = measure_speed(loaded, dialogues, cost_settings, reference="baseline")
    for name, result in results.items():
        model, tokenizer = result.pop("loaded")
        result["cost"] = {"parameters": count_parameters(model), **size_on_disk(result["loaded_from"]), **speeds[name],
                          "flops_per_generated_token": flops_per_generated_token(model, tokenizer, dialogues[0],
                                                                                 cost_settings)}
        del model


def metric_entries(result: dict, reference_weights: int | None = None) -> dict:
    """``{"rougeL": {"value": 0.61}, …}``: the shape a SageMaker PropertyFile + JsonGet reads."""
    entries = {name: {"value": round(result["rouge"][name], 6)} for name in ROUGE_TYPES}
    entries["repetition_rate"] = {"value": round(result["repetition"]["rate"], 6)}
    entries[FACTS_RECORDED] = {"value": int(bool(result["facts"]))}
    if result["facts"]:
        entries["facts_all_right"] = {"value": round(result["facts"]["all_facts_right"], 6)}
        for slot, value in result["facts"]["per_slot"].items():
            entries[f"facts_{slot}"] = {"value": round(value, 6)}
    cost = result.get("cost")
    if cost:
        for name in ("parameters", "weights_bytes", "latency_p50_ms", "latency_p95_ms", "latency_ratio",
                     "throughput_tokens_per_s", "flops_per_generated_token"):
            if cost.get(name) is not None:
                entries[name] = {"value": cost[name]}
        if reference_weights:
            entries["compression_ratio"] = {"value": round(reference_weights / cost["weights_bytes"], 4)}
    return entries


def model_quality_document(result: dict, rows: list[dict]) -> dict:
    """The ModelQuality statistics document registered with the model package.

    SageMaker stores it as an opaque JSON document (MetricsSource); this follows Model
    Monitor's statistics layout (``version``, ``dataset``, metrics as value and standard
    deviation) under a section named for the task, as the MLOps project templates do.
    """
    per_example = rouge_per_example(result["predictions"], [row["references"] for row in rows])
    metrics = {
        name: {"value": round(statistics.mean(s[name] for s in per_example), 6),
               "standard_deviation": round(statistics.pstdev(s[name] for s in per_example), 6)}
        for name in ROUGE_TYPES
    }
    return {"version": 0.0, "dataset": {"item_count": len(rows)}, "summarization_metrics": metrics}


def print_table(results: list[tuple[str, dict]], reference_weights: int) -> None:
    has_facts = any(r.get("facts") for _, r in results)
    columns = ["rouge1", "rouge2", "rougeL", "rougeLsum"] + (["facts"] if has_facts else []) + \
        ["repeat", "params", "size MB", "compress", "p50 ms", "p95 ms", "vs base", "tok/s", "MFLOP/tok"]
    print(f"{'':<22}" + "".join(f"{c:>10}" for c in columns))
    for label, r in results:
        cells = [f"{100 * r['rouge'][n]:.1f}" for n in ROUGE_TYPES]
        if has_facts:
            cells.append(f"{100 * r['facts']['all_facts_right']:.1f}" if r.get("facts") else "")
        cells.append(f"{100 * r['repetition']['rate']:.1f}")
        cost = r.get("cost")
        if cost:
            flops = cost["flops_per_generated_token"]
            cells += [f"{cost['parameters'] / 1e6:.2f}M", f"{cost['weights_bytes'] / 1e6:.2f}",
                      f"{reference_weights / cost['weights_bytes']:.2f}x", f"{cost['latency_p50_ms']:.1f}",
                      f"{cost['latency_p95_ms']:.1f}", f"{cost['latency_ratio']:.2f}x",
                      f"{cost['throughput_tokens_per_s']:.0f}",
                      f"{flops / 1e6:.1f}" if flops else "n/a"]
        print(f"{label:<22}" + "".join(f"{c:>10}" for c in cells))
    print("(ROUGE F1 x100, best over references; facts: % of summaries with every speaker and slot value right;\n"
          " repeat: % of summaries that repeat themselves where no reference does;\n"
          " compress: baseline weights / these weights; latency at batch 1 and tok/s at the throughput batch, "
          "fixed new tokens;\n vs base: median latency over the baseline's on the same input in the same round)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_dir = require_path(args.model_dir, "--model-dir", *MODEL_ENV)
    baseline_dir = require_path(args.baseline_dir, "--baseline-dir", *BASELINE_ENV)
    data_dir = require_path(args.data_dir, "--data-dir", *DATA_ENV)
    output_dir = require_output_dir(args.output_dir, "--output-dir", args.overwrite, *OUTPUT_ENV)
    package_dir = require_output_dir(args.package_dir, "--package-dir", args.overwrite) if args.package_dir else None
    if package_dir and package_dir.absolute() == output_dir.absolute():
        raise StepError(f"--package-dir {package_dir} is the --output-dir; give the package its own folder")
    if args.max_new_tokens < 1 or args.num_beams < 1 or args.batch_size < 1:
        raise StepError("--max-new-tokens, --num-beams and --batch-size must be at least 1")
    check_python_version(args.serving_python)
    if args.select_within_drop is not None and not 0 <= args.select_within_drop <= 1:
        raise StepError(f"--select-within-drop {args.select_within_drop:g}: expected a fraction in [0, 1] (ROUGE is "
                        "0..1 in evaluation.json), e.g. 0.05 to allow 5 ROUGE-L points below the --model-dir model")
    for flag, value in (("--select-max-fact-drop", args.select_max_fact_drop),
                        ("--select-max-repetition", args.select_max_repetition)):
        if not 0 <= value <= 1:
            raise StepError(f"{flag} {value:g}: expected a fraction in [0, 1], e.g. 0.05 for 5% of the summaries")
    rows = read_split(data_dir, args.split)[: args.max_examples]
    train_summaries = [row["summary"] for row in read_split(data_dir, "train")]
    compare, skipped = [], []
    for name, folder in parse_compare(args.compare):
        reason = skipped_reason(folder)
        if reason is None:
            compare.append((name, folder))
        else:  # an optimization branch that was not chosen: nothing to score
            skipped.append({"name": name, "model_dir": str(folder), "reason": reason})
            print(f"note: --compare {name}={folder} was skipped by its step ({reason}); leaving it out")
    cost_settings = CostSettings(new_tokens=args.speed_new_tokens, latency_inputs=args.speed_inputs,
                                 repeats=args.speed_repeats, throughput_batch=args.throughput_batch,
                                 max_source_length=args.max_source_length)
    if min(cost_settings.new_tokens, cost_settings.latency_inputs, cost_settings.repeats, cost_settings.throughput_batch) < 1:
        raise StepError("--speed-inputs, --speed-repeats, --speed-new-tokens and --throughput-batch must be at least 1")
    configure_runtime()

    generation = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams, "batch_size": args.batch_size,
                  "max_source_length": args.max_source_length}
    models = [("baseline", baseline_dir, "--baseline-dir"), ("model", model_dir, "--model-dir")] + \
        [(name, folder, f"--compare {name}") for name, folder in compare]
    results = {name: load_and_score(name, folder, flag, rows, generation) for name, folder, flag in models}
    measure_costs(results, rows, cost_settings)
    reference_weights = results["baseline"]["cost"]["weights_bytes"]

    print(f"searching the best constant output among {len(set(train_summaries))} distinct training summaries")
    constant = best_constant_output(train_summaries, [row["references"] for row in rows],
                                    max_candidates=args.constant_candidates, seed=args.seed)
    constant_result = score([constant["text"]] * len(rows), rows)
    print_table([("baseline", results["baseline"]), ("best constant output", constant_result), ("model", results["model"])]
                + [(name, results[name]) for name, _ in compare], reference_weights)

    selection, chosen = None, "model"  # chosen: the key in results of the model that the top-level metrics describe
    if args.select_within_drop is not None:
        selection = select_variant({FINETUNED: results["model"], **{name: results[name] for name, _ in compare}},
                                   args.select_within_drop, args.select_max_fact_drop, args.select_max_repetition)
        print_selection(selection)
        chosen = "model" if selection["variant"] == FINETUNED else selection["variant"]

    chosen_rouge_l = results[chosen]["rouge"]["rougeL"]
    metrics = {
        **metric_entries(results[chosen], reference_weights),
        "rougeL_gain_over_baseline": {"value": round(chosen_rouge_l - results["baseline"]["rouge"]["rougeL"], 6)},
        "rougeL_gain_over_constant": {"value": round(chosen_rouge_l - constant["scores"]["rougeL"], 6)},
        **gate_metrics(results, chosen, selection),
    }
    evaluation = {"metrics": metrics}
    if selection:
        evaluation.update({"selected_variant": selection["variant"], "selection": selection})
    evaluation.update({
        "baseline": {"metrics": metric_entries(results["baseline"]), "model_dir": str(baseline_dir)},
        "constant_output": {"metrics": metric_entries(constant_result), "text": constant["text"],
                            "candidates_tried": constant["candidates_tried"]},
        "model": {"model_dir": str(model_dir), "card": results["model"]["card"],
                  # with a selection the top-level metrics are the winner's; the --model-dir model's stay here
                  **({"metrics": metric_entries(results["model"], reference_weights)} if selection else {})},
        "comparisons": {name: {"metrics": metric_entries(results[name], reference_weights), "model_dir": str(folder),
                               "card": results[name]["card"]} for name, folder in compare},
        **({"skipped": skipped} if args.compare else {}),
        "data": {"split": args.split, "examples": len(rows), "data_dir": str(data_dir)},
        "generation": generation,
        "cost_measurement": settings_dict(cost_settings),
    })
    if package_dir:  # published before evaluation.json, so a complete evaluation implies its package exists
        name = selection["variant"] if selection else FINETUNED
        with atomic_output_dir(package_dir, args.overwrite, flag="--package-dir") as staging:
            archive = package_model(results[chosen]["loaded_from"], staging / MODEL_ARCHIVE, args.serving_python,
                                    args.wheelhouse, ship_runtime_wheel=not args.no_runtime_wheel)
            size = archive.stat().st_size
        evaluation["package"] = {"variant": name, "path": str(package_dir / MODEL_ARCHIVE), "bytes": size,
                                 "model_dir": results[chosen]["model_dir"]}
        print(f"packaged {name} ({results[chosen]['model_dir']}) as {package_dir / MODEL_ARCHIVE}, {size / 1e6:.2f} MB")
    with atomic_output_dir(output_dir, args.overwrite) as staging:
        (staging / EVALUATION_FILE).write_text(json.dumps(evaluation, indent=2) + "\n", encoding="utf-8")
        (staging / MODEL_QUALITY_FILE).write_text(
            json.dumps(model_quality_document(results[chosen], rows), indent=2) + "\n", encoding="utf-8")
        write_jsonl(staging / PREDICTIONS_FILE, (
            {"id": row["id"], "dialogue": row["dialogue"], "references": row["references"],
             "prediction": results["model"]["predictions"][i], "baseline_prediction": results["baseline"]["predictions"][i],
             **{f"{name}_prediction": results[name]["predictions"][i] for name, _ in compare},
             **({"facts": row["facts"]} if row.get("facts") else {})}
            for i, row in enumerate(rows)))
    print(f"wrote {EVALUATION_FILE}, {MODEL_QUALITY_FILE} and {PREDICTIONS_FILE} to {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_step(main))
