"""Choosing the variant to register among the scored models, and the gate's figures beside its metrics."""
from __future__ import annotations

FACTS_RECORDED = "facts_recorded"   # the metric that says whether the fact figures mean anything (1) or not (0)
FACT_GATE_METRICS = ("facts_all_right", "facts_all_right_drop")


def select_variant(candidates: dict[str, dict], max_drop: float, max_fact_drop: float = 1.0,
                   max_repetition: float = 1.0) -> dict:
    """The model to register among ``candidates`` (name → an evaluate.py ``load_and_score`` result with
    ``cost``; the first is the reference).

    Eligible: ROUGE-L at most ``max_drop`` below the reference's, the share of summaries with every
    fact right at most ``max_fact_drop`` below the reference's (where the data records facts), and at
    most ``max_repetition`` of its summaries repeating themselves. Winner: the lowest p95 latency at
    batch 1 among the eligible; ties go to smaller weights, then to the earlier candidate. When none
    is eligible (the reference itself repeats too much) the reference is returned for the gate to
    fail. Returns the ``selection`` entry of evaluation.json.
    """
    names = list(candidates)
    reference = names[0]
    reference_result = candidates[reference]
    rows = []
    for name in names:
        result = candidates[name]
        facts = all_facts_right(result)
        # drops are rounded as written to the file, so they read consistently
        rows.append({"name": name, "model_dir": result["model_dir"], "rougeL": round(result["rouge"]["rougeL"], 6),
                     "rougeL_drop": round(reference_result["rouge"]["rougeL"] - result["rouge"]["rougeL"], 6),
                     "facts_all_right": None if facts is None else round(facts, 6),
                     "facts_all_right_drop": None if facts is None else round(all_facts_right(reference_result) - facts, 6),
                     "repetition_rate": round(result["repetition"]["rate"], 6),
                     "latency_p95_ms": result["cost"]["latency_p95_ms"], "weights_bytes": result["cost"]["weights_bytes"]})
    for row in rows:
        row["problems"] = _problems(row, reference, max_drop, max_fact_drop, max_repetition)
        row["eligible"] = not row["problems"]
    eligible = [row for row in rows if row["eligible"]]
    winner = min(eligible, key=lambda row: (row["latency_p95_ms"], row["weights_bytes"])) if eligible else rows[0]
    tied = any(row is not winner and row["latency_p95_ms"] == winner["latency_p95_ms"] for row in eligible)
    for row in rows:
        row["why"] = _why(row, winner, len(eligible), tied, reference, max_drop)
        del row["problems"]
    rule = (f"eligible: ROUGE-L at most {max_drop:g} below the {reference} model's "
            f"({reference_result['rouge']['rougeL']:.4f}), the share of summaries with every fact right at most "
            f"{max_fact_drop:g} below its share (where the data records facts), and at most {max_repetition:g} of "
            "the summaries repeating themselves; chosen: the eligible model with the lowest p95 latency at batch 1 "
            "(ties: smaller weights on disk)")
    return {"variant": winner["name"], "model_dir": winner["model_dir"], "rule": rule, "max_rougeL_drop": max_drop,
            "max_facts_all_right_drop": max_fact_drop, "max_repetition_rate": max_repetition, "candidates": rows}


def all_facts_right(result: dict) -> float | None:
    return result["facts"]["all_facts_right"] if result.get("facts") else None


def _problems(row: dict, reference: str, max_drop: float, max_fact_drop: float, max_repetition: float) -> list[str]:
    """Why ``row`` may not be registered ([] if it may). 1e-9: float noise in the subtractions."""
    problems = []
    if row["name"] != reference and row["rougeL_drop"] > max_drop + 1e-9:
        problems.append(f"ROUGE-L {row['rougeL_drop']:.4f} below the {reference} model's, more than the {max_drop:g} "
                        "allowed")
    if row["name"] != reference and row["facts_all_right_drop"] is not None \
            and row["facts_all_right_drop"] > max_fact_drop + 1e-9:
        problems.append(f"every fact right in {row['facts_all_right_drop']:.4f} fewer of its summaries than the "
                        f"{reference} model, more than the {max_fact_drop:g} allowed")
    if row["repetition_rate"] > max_repetition + 1e-9:
        problems.append(f"repeats itself in {row['repetition_rate']:.4f} of its summaries, more than the "
                        f"{max_repetition:g} allowed")
    return problems


def _why(row: dict, winner: dict, eligible_count: int, tied: bool, reference: str, max_drop: float) -> str:
    if not row["eligible"]:
        fallback = ("; no model is eligible, so the gate judges this one" if row is winner else "")
        return "not eligible: " + "; ".join(row["problems"]) + fallback
    quality = (f"the {reference} model itself" if row["name"] == reference
               else f"ROUGE-L drop {row['rougeL_drop']:.4f} within the {max_drop:g} allowed")
    if row is winner:
        if eligible_count == 1:
            return f"{quality}; the only eligible model"
        ties = ", tied with another but smaller weights" if tied else ""
        return f"{quality}; lowest p95 latency among the {eligible_count} eligible, {row['latency_p95_ms']:.1f} ms{ties}"
    if row["latency_p95_ms"] == winner["latency_p95_ms"]:
        return (f"{quality}; same p95 latency as {winner['name']} but larger weights "
                f"({row['weights_bytes']:,} vs {winner['weights_bytes']:,} bytes)")
    return f"{quality}; slower: p95 {row['latency_p95_ms']:.1f} ms vs {winner['name']}'s {winner['latency_p95_ms']:.1f} ms"


def print_selection(selection: dict) -> None:
    print(f"choosing the model to register: {selection['rule']}")
    print(f"{'':<22}{'rougeL':>10}{'drop':>10}{'facts':>10}{'drop':>10}{'repeat':>10}{'p95 ms':>10}{'size MB':>10}"
          "  eligible")

    def points(value):
        return "" if value is None else f"{100 * value:.1f}"

    for row in selection["candidates"]:
        print(f"{row['name']:<22}{points(row['rougeL']):>10}{points(row['rougeL_drop']):>10}"
              f"{points(row['facts_all_right']):>10}{points(row['facts_all_right_drop']):>10}"
              f"{points(row['repetition_rate']):>10}{row['latency_p95_ms']:>10.1f}{row['weights_bytes'] / 1e6:>10.2f}"
              f"  {'yes' if row['eligible'] else 'no'}")
    winner = next(row for row in selection["candidates"] if row["name"] == selection["variant"])
    print(f"registering {winner['name']}: {winner['why']}")


def gate_metrics(results: dict[str, dict], chosen: str, selection: dict | None) -> dict:
    """The top-level metrics beside the chosen model's own that the gate reads.

    The fact figures are written even where the data records none (``facts_recorded`` 0, with a
    note): SageMaker resolves every JsonGet of a condition, also the side of an Or that does not
    decide it. Their value there is a placeholder the gate never compares.
    """
    recorded = bool(results[chosen]["facts"])
    metrics = {FACTS_RECORDED: {"value": int(recorded), "note": "checked: the data records facts" if recorded
                                else "skipped: the data records no facts (e.g. DialogSum)"}}
    if not recorded:
        metrics.update({name: {"value": 0.0, "placeholder": True} for name in FACT_GATE_METRICS})
    if selection:
        metrics["rougeL_drop"] = {"value": round(results["model"]["rouge"]["rougeL"] - results[chosen]["rouge"]["rougeL"], 6)}
        if recorded:
            drop = all_facts_right(results["model"]) - all_facts_right(results[chosen])
            metrics["facts_all_right_drop"] = {"value": round(drop, 6)}
    return metrics
