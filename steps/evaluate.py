"""Score a candidate model against a baseline on the same test split with the same generation settings.

Quality: ROUGE-1/2/L/Lsum (best over references per example), the best constant output (one
training summary given for every input: what the template alone earns) and, where the data
records its facts (synthetic), how often the speakers and slot values in the summary are right.

Writes to ``--output-dir``: ``evaluation.json`` (read by the pipeline's gate through a
PropertyFile: ``metrics.<name>.value``) and ``predictions.jsonl`` (dialogue, references and
both models' predictions) so a person can read what the models do.

Example:
  python steps/evaluate.py --model-dir out/finetuned --baseline-dir out/model --data-dir out/data \\
      --output-dir out/evaluation
"""
from __future__ import annotations

import argparse
import json
import sys

from stepkit.contract import atomic_output_dir, env_path, path_help, require_path
from stepkit.errors import StepError, run_step
from stepkit.metrics import ROUGE_TYPES, best_constant_output, fact_accuracy, rouge
from stepkit.modeling import configure_runtime, count_parameters, load_model_and_tokenizer, read_model_card, summarize
from stepkit.records import read_split, write_jsonl

MODEL_ENV = ("SM_CHANNEL_MODEL",)
BASELINE_ENV = ("SM_CHANNEL_BASELINE",)
DATA_ENV = ("SM_CHANNEL_DATA", "SM_CHANNEL_TEST")
OUTPUT_ENV = ("SM_OUTPUT_DATA_DIR",)
EVALUATION_FILE = "evaluation.json"
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
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def score(predictions: list[str], rows: list[dict]) -> dict:
    facts = fact_accuracy(predictions, [row.get("facts") for row in rows])
    return {"rouge": rouge(predictions, [row["references"] for row in rows]), "facts": facts}


def metric_entries(scores: dict, prefix: str = "") -> dict:
    """``{"rougeL": {"value": 0.61}, …}``: the shape a SageMaker PropertyFile + JsonGet reads."""
    entries = {f"{prefix}{name}": {"value": round(scores["rouge"][name], 6)} for name in ROUGE_TYPES}
    if scores["facts"]:
        entries[f"{prefix}facts_all_right"] = {"value": round(scores["facts"]["all_facts_right"], 6)}
        for slot, value in scores["facts"]["per_slot"].items():
            entries[f"{prefix}facts_{slot}"] = {"value": round(value, 6)}
    return entries


def print_table(rows: list[tuple[str, dict]]) -> None:
    has_facts = any(scores.get("facts") for _, scores in rows)
    header = f"{'':<22}" + "".join(f"{name:>10}" for name in ROUGE_TYPES) + (f"{'facts':>10}" if has_facts else "")
    print(header)
    for label, scores in rows:
        line = f"{label:<22}" + "".join(f"{100 * scores['rouge'][name]:>10.1f}" for name in ROUGE_TYPES)
        if has_facts:
            facts = scores.get("facts")
            line += f"{100 * facts['all_facts_right']:>10.1f}" if facts else f"{'':>10}"
        print(line)
    print("(ROUGE F1 x100, best over references; facts: % of summaries with every speaker and slot value right)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_dir = require_path(args.model_dir, "--model-dir", *MODEL_ENV)
    baseline_dir = require_path(args.baseline_dir, "--baseline-dir", *BASELINE_ENV)
    data_dir = require_path(args.data_dir, "--data-dir", *DATA_ENV)
    output_dir = require_path(args.output_dir, "--output-dir", *OUTPUT_ENV)
    if args.max_new_tokens < 1 or args.num_beams < 1 or args.batch_size < 1:
        raise StepError("--max-new-tokens, --num-beams and --batch-size must be at least 1")
    rows = read_split(data_dir, args.split)[: args.max_examples]
    train_summaries = [row["summary"] for row in read_split(data_dir, "train")]
    configure_runtime()

    generation = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams, "batch_size": args.batch_size,
                  "max_source_length": args.max_source_length}
    dialogues = [row["dialogue"] for row in rows]
    results, predictions = {}, {}
    for role, folder, flag in (("model", model_dir, "--model-dir"), ("baseline", baseline_dir, "--baseline-dir")):
        model, tokenizer = load_model_and_tokenizer(folder, flag)
        print(f"generating {len(rows)} {args.split} summaries with the {role} ({folder})")
        predictions[role] = summarize(model, tokenizer, dialogues, **generation)
        results[role] = {"model_dir": str(folder), "card": read_model_card(folder), "parameters": count_parameters(model),
                         **score(predictions[role], rows)}
        del model

    print(f"searching the best constant output among {len(set(train_summaries))} distinct training summaries")
    constant = best_constant_output(train_summaries, [row["references"] for row in rows],
                                    max_candidates=args.constant_candidates, seed=args.seed)
    constant_scores = {"rouge": constant["scores"],
                       "facts": fact_accuracy([constant["text"]] * len(rows), [row.get("facts") for row in rows])}
    print_table([("baseline", results["baseline"]), ("best constant output", constant_scores), ("model", results["model"])])

    model_rouge_l, baseline_rouge_l = results["model"]["rouge"]["rougeL"], results["baseline"]["rouge"]["rougeL"]
    evaluation = {
        "metrics": {
            **metric_entries(results["model"]),
            "rougeL_gain_over_baseline": {"value": round(model_rouge_l - baseline_rouge_l, 6)},
            "rougeL_gain_over_constant": {"value": round(model_rouge_l - constant["scores"]["rougeL"], 6)},
        },
        "baseline": {"metrics": metric_entries(results["baseline"]), "model_dir": str(baseline_dir),
                     "parameters": results["baseline"]["parameters"]},
        "constant_output": {"metrics": metric_entries(constant_scores), "text": constant["text"],
                            "candidates_tried": constant["candidates_tried"]},
        "model": {"model_dir": str(model_dir), "parameters": results["model"]["parameters"],
                  "card": results["model"]["card"]},
        "data": {"split": args.split, "examples": len(rows), "data_dir": str(data_dir)},
        "generation": generation,
    }
    with atomic_output_dir(output_dir, args.overwrite) as staging:
        (staging / EVALUATION_FILE).write_text(json.dumps(evaluation, indent=2) + "\n", encoding="utf-8")
        write_jsonl(staging / PREDICTIONS_FILE, (
            {"id": row["id"], "dialogue": row["dialogue"], "references": row["references"],
             "prediction": predictions["model"][i], "baseline_prediction": predictions["baseline"][i],
             **({"facts": row["facts"]} if row.get("facts") else {})}
            for i, row in enumerate(rows)))
    print(f"wrote {EVALUATION_FILE} and {PREDICTIONS_FILE} to {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_step(main))
