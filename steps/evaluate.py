"""Score a candidate model against a baseline on the same test split with the same generation settings.

Quality: ROUGE-1/2/L/Lsum (best over references per example), the best constant output (one
training summary given for every input: what the template alone earns) and, where the data
records its facts (synthetic), how often the speakers and slot values in the summary are right.
Cost: parameters, size on disk, compression ratio vs the baseline, FLOPs per generated token,
latency p50/p95 at batch 1 and throughput at a larger batch, on the same inputs, after warm-up.

Writes to ``--output-dir``: ``evaluation.json`` (read by the pipeline's gate through a
PropertyFile: ``metrics.<name>.value``), ``model_quality.json`` (the Model Registry's
ModelQuality statistics document) and ``predictions.jsonl`` (dialogue, references and every
model's prediction) so a person can read what the models do. ``--compare NAME=DIR`` adds
more models (e.g. each optimized variant) to the same table and files.

Example:
  python steps/evaluate.py --model-dir out/finetuned --baseline-dir out/model --data-dir out/data \\
      --output-dir out/evaluation --compare int8=out/int8 --compare pruned=out/pruned
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from stepkit.contract import atomic_output_dir, env_path, path_help, require_output_dir, require_path
from stepkit.cost import CostSettings, flops_per_generated_token, measure_speed, settings_dict, size_on_disk
from stepkit.errors import StepError, run_step
from stepkit.metrics import ROUGE_TYPES, best_constant_output, fact_accuracy, rouge, rouge_per_example
from stepkit.modeling import configure_runtime, count_parameters, load_model_and_tokenizer, read_model_card, summarize
from stepkit.records import read_split, write_jsonl

MODEL_ENV = ("SM_CHANNEL_MODEL",)
BASELINE_ENV = ("SM_CHANNEL_BASELINE",)
DATA_ENV = ("SM_CHANNEL_DATA", "SM_CHANNEL_TEST")
OUTPUT_ENV = ("SM_OUTPUT_DATA_DIR",)
EVALUATION_FILE = "evaluation.json"
MODEL_QUALITY_FILE = "model_quality.json"
PREDICTIONS_FILE = "predictions.jsonl"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
                        help="another model to score beside the candidate, e.g. an optimized variant (repeatable)")
    cost = parser.add_argument_group("cost measurement")
    cost.add_argument("--speed-inputs", type=int, default=8, help="distinct inputs timed at batch 1 (default: 8)")
    cost.add_argument("--speed-repeats", type=int, default=3, help="timings per input (default: 3)")
    cost.add_argument("--speed-new-tokens", type=int, default=32, help="tokens generated per timed input, the same for "
                                                                       "every model (default: 32)")
    cost.add_argument("--throughput-batch", type=int, default=8, help="batch size for throughput (default: 8)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def parse_compare(specs: list[str]) -> list[tuple[str, Path]]:
    models = []
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise StepError(f"--compare {spec!r}: expected NAME=DIR, e.g. --compare int8=out/int8")
        if name.strip() in ("model", "baseline") or name.strip() in (n for n, _ in models):
            raise StepError(f"--compare {spec!r}: the name {name.strip()!r} is taken; give each model its own name")
        models.append((name.strip(), Path(folder.strip())))
    return models


def score(predictions: list[str], rows: list[dict]) -> dict:
    facts = fact_accuracy(predictions, [row.get("facts") for row in rows])
    return {"rouge": rouge(predictions, [row["references"] for row in rows]), "facts": facts}


def assess(folder: Path, flag: str, rows: list[dict], generation: dict, cost_settings: CostSettings) -> dict:
    """Quality and cost of one model folder on ``rows``; the model is freed before returning."""
    model, tokenizer = load_model_and_tokenizer(folder, flag)
    dialogues = [row["dialogue"] for row in rows]
    print(f"generating {len(rows)} summaries with {folder}")
    predictions = summarize(model, tokenizer, dialogues, **generation)
    print(f"timing {cost_settings.latency_inputs} inputs x {cost_settings.repeats} at batch 1 and a batch of "
          f"{cost_settings.throughput_batch}, {cost_settings.new_tokens} new tokens each")
    speed = measure_speed(model, tokenizer, dialogues, cost_settings)
    flops = flops_per_generated_token(model, tokenizer, dialogues[0], cost_settings)
    result = {
        "model_dir": str(folder), "card": read_model_card(folder), "predictions": predictions,
        **score(predictions, rows),
        "cost": {"parameters": count_parameters(model), **size_on_disk(folder), **speed,
                 "flops_per_generated_token": flops},
    }
    del model
    return result


def metric_entries(result: dict, reference_weights: int | None = None) -> dict:
    """``{"rougeL": {"value": 0.61}, …}``: the shape a SageMaker PropertyFile + JsonGet reads."""
    entries = {name: {"value": round(result["rouge"][name], 6)} for name in ROUGE_TYPES}
    if result["facts"]:
        entries["facts_all_right"] = {"value": round(result["facts"]["all_facts_right"], 6)}
        for slot, value in result["facts"]["per_slot"].items():
            entries[f"facts_{slot}"] = {"value": round(value, 6)}
    cost = result.get("cost")
    if cost:
        for name in ("parameters", "weights_bytes", "latency_p50_ms", "latency_p95_ms", "throughput_tokens_per_s",
                     "flops_per_generated_token"):
            if cost[name] is not None:
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
        ["params", "size MB", "compress", "p50 ms", "p95 ms", "tok/s", "MFLOP/tok"]
    print(f"{'':<22}" + "".join(f"{c:>10}" for c in columns))
    for label, r in results:
        cells = [f"{100 * r['rouge'][n]:.1f}" for n in ROUGE_TYPES]
        if has_facts:
            cells.append(f"{100 * r['facts']['all_facts_right']:.1f}" if r.get("facts") else "")
        cost = r.get("cost")
        if cost:
            flops = cost["flops_per_generated_token"]
            cells += [f"{cost['parameters'] / 1e6:.2f}M", f"{cost['weights_bytes'] / 1e6:.2f}",
                      f"{reference_weights / cost['weights_bytes']:.2f}x", f"{cost['latency_p50_ms']:.1f}",
                      f"{cost['latency_p95_ms']:.1f}", f"{cost['throughput_tokens_per_s']:.0f}",
                      f"{flops / 1e6:.1f}" if flops else "n/a"]
        print(f"{label:<22}" + "".join(f"{c:>10}" for c in cells))
    print("(ROUGE F1 x100, best over references; facts: % of summaries with every speaker and slot value right;\n"
          " compress: baseline weights / these weights; latency at batch 1 and tok/s at the throughput batch, "
          "fixed new tokens)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_dir = require_path(args.model_dir, "--model-dir", *MODEL_ENV)
    baseline_dir = require_path(args.baseline_dir, "--baseline-dir", *BASELINE_ENV)
    data_dir = require_path(args.data_dir, "--data-dir", *DATA_ENV)
    output_dir = require_output_dir(args.output_dir, "--output-dir", args.overwrite, *OUTPUT_ENV)
    if args.max_new_tokens < 1 or args.num_beams < 1 or args.batch_size < 1:
        raise StepError("--max-new-tokens, --num-beams and --batch-size must be at least 1")
    rows = read_split(data_dir, args.split)[: args.max_examples]
    train_summaries = [row["summary"] for row in read_split(data_dir, "train")]
    compare = parse_compare(args.compare)
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
    results = {name: assess(folder, flag, rows, generation, cost_settings) for name, folder, flag in models}
    reference_weights = results["baseline"]["cost"]["weights_bytes"]

    print(f"searching the best constant output among {len(set(train_summaries))} distinct training summaries")
    constant = best_constant_output(train_summaries, [row["references"] for row in rows],
                                    max_candidates=args.constant_candidates, seed=args.seed)
    constant_result = {"rouge": constant["scores"],
                       "facts": fact_accuracy([constant["text"]] * len(rows), [row.get("facts") for row in rows])}
    print_table([("baseline", results["baseline"]), ("best constant output", constant_result), ("model", results["model"])]
                + [(name, results[name]) for name, _ in compare], reference_weights)

    model_rouge_l = results["model"]["rouge"]["rougeL"]
    evaluation = {
        "metrics": {
            **metric_entries(results["model"], reference_weights),
            "rougeL_gain_over_baseline": {"value": round(model_rouge_l - results["baseline"]["rouge"]["rougeL"], 6)},
            "rougeL_gain_over_constant": {"value": round(model_rouge_l - constant["scores"]["rougeL"], 6)},
        },
        "baseline": {"metrics": metric_entries(results["baseline"]), "model_dir": str(baseline_dir)},
        "constant_output": {"metrics": metric_entries(constant_result), "text": constant["text"],
                            "candidates_tried": constant["candidates_tried"]},
        "model": {"model_dir": str(model_dir), "card": results["model"]["card"]},
        "comparisons": {name: {"metrics": metric_entries(results[name], reference_weights), "model_dir": str(folder),
                               "card": results[name]["card"]} for name, folder in compare},
        "data": {"split": args.split, "examples": len(rows), "data_dir": str(data_dir)},
        "generation": generation,
        "cost_measurement": settings_dict(cost_settings),
    }
    with atomic_output_dir(output_dir, args.overwrite) as staging:
        (staging / EVALUATION_FILE).write_text(json.dumps(evaluation, indent=2) + "\n", encoding="utf-8")
        (staging / MODEL_QUALITY_FILE).write_text(
            json.dumps(model_quality_document(results["model"], rows), indent=2) + "\n", encoding="utf-8")
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
