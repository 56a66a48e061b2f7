"""What a finished local execution prints: its steps, the quality gate's verdict, the hint for what to do
next; and its ``summary.json`` in the run folder."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .definition import NAMES
from .files import write_json_atomic
from .runfacts import gate_facts
from .tables import GATE


def gate_sentence(gate: dict) -> str:
    """``ROUGE-L 0.64 (min 0.4), p95 latency 12.3 ms (max 1000), …``: every condition, measured and its threshold
    (or why it was skipped)."""
    return ", ".join(f"{c['label']} {c['skipped']}" if c.get("skipped") else
                     f"{c['label']} {fmt(c['measured'])}{c['unit']} ({c['bound']} {c['threshold']})"
                     + ("" if c["passed"] is not False else " FAILED") for c in gate["conditions"])


def summarize_execution(record: dict, run_dir: Path) -> int:
    print()
    print(f"{'step':<18}{'status':<11}{'seconds':>9}  cached")
    print("-" * 46)
    for step in record["Steps"]:
        cached = "yes" if step.get("CacheHitResult") else ""
        print(f"{step['StepName']:<18}{step['StepStatus']:<11}{step.get('DurationSeconds') or 0:>9.1f}  {cached}")
    total = sum(step.get("DurationSeconds") or 0 for step in record["Steps"])
    print(f"{'total':<29}{total:>9.1f}")
    gate = gate_facts(record)
    if gate:
        verdict = {True: "PASSED", False: "FAILED", None: "not reached"}[gate["passed"]]
        print(f"\nquality gate {verdict} for variant {gate['variant']}: {gate_sentence(gate)}")
        if gate["why"]:
            print(f"variant choice: {gate['why']}")
        for row in gate["candidates"] or []:
            figures = ", ".join(f"{c['label']} {fmt(row[c['metric']])}{c['unit']}" for c in gate["candidate_columns"]
                                if row.get(c["metric"]) is not None)
            print(f"  {row['name']:<10} {figures}  {row.get('why', '')}")
    registered = next((s["Metadata"]["RegisterModel"]["Arn"] for s in record["Steps"]
                       if s["StepName"] == NAMES.register and s["StepStatus"] == "Succeeded"), None)
    if registered:
        print(f"registered model package: {registered}")
    status = record["PipelineExecutionStatus"]
    print(f"\nexecution {record['ExecutionId']}: {status}"
          + (f" — {record['FailureReason']}" if record.get("FailureReason") else ""))
    gate_failed = any(s["StepType"] == "Fail" for s in record["Steps"])
    if status == "Failed" and gate_failed:
        failed = [c for c in (gate or {}).get("conditions", []) if c["passed"] is False]
        hint = ", ".join(f"--param {c['parameter']}=… ({c['label']} {fmt(c['measured'])}{c['unit']} against "
                         f"{c['bound']} {c['threshold']})" for c in failed) or \
            "one of " + ", ".join(f"--param {c.parameter}=…" for c in GATE)
        print(f"the model did not pass the gate; change the model or the threshold that failed ({hint}) and run "
              "again: unchanged jobs come from the cache")
    elif status in ("Failed", "Stopped") and record.get("Resumable", True):
        print(f"fix the cause, then: flanops run --resume {record['ExecutionId']}")
    summary = {
        "execution_arn": record["PipelineExecutionArn"], "execution_id": record["ExecutionId"], "status": status,
        "failure_reason": record.get("FailureReason"), "run_dir": str(run_dir), "parameters": record["Parameters"],
        "steps": [{"name": s["StepName"], "type": s["StepType"], "status": s["StepStatus"],
                   "seconds": s.get("DurationSeconds"), "cached": bool(s.get("CacheHitResult")),
                   "failure_reason": s.get("FailureReason")} for s in record["Steps"]],
        "gate": gate, "model_package_arn": registered,
    }
    write_json_atomic(run_dir / "summary.json", summary)
    print(f"summary: {run_dir / 'summary.json'}")
    return 0 if status == "Succeeded" else 1


def fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)

