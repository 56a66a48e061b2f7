"""Execution records: one JSON file per local execution under the flanops home, read back by id or ARN."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from .failures import StepFailed
from .home import process_alive


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def pipeline_of(execution_arn: str) -> str:
    """arn:aws:sagemaker:<region>:<account>:pipeline/<name>/execution/<id> → <name>."""
    return execution_arn.split(":pipeline/", 1)[-1].split("/execution/", 1)[0]


def records_dir(home: Path, pipeline_name: str) -> Path:
    return home / "executions" / pipeline_name


def load_execution(home: Path, pipeline_name: str, execution: str) -> dict:
    """An execution record by id or ARN."""
    execution_id = execution.rsplit("/", 1)[-1]
    path = records_dir(home, pipeline_name) / f"{execution_id}.json"
    if not path.is_file():
        known = ", ".join(p.stem for p in sorted(records_dir(home, pipeline_name).glob("*.json"))) or "none"
        raise StepFailed(f"no execution {execution_id!r} of pipeline {pipeline_name!r} (known: {known}); "
                         "list them with `flanops executions`")
    return json.loads(path.read_text(encoding="utf-8"))


def list_executions(home: Path, pipeline_name: str) -> list[dict]:
    records = [json.loads(p.read_text(encoding="utf-8")) for p in records_dir(home, pipeline_name).glob("*.json")]
    for record in records:
        mark_orphaned(record)
    return sorted(records, key=lambda r: r["CreationTime"], reverse=True)


def mark_orphaned(record: dict) -> None:
    """An execution whose executor process died shows as Failed, as it can no longer finish."""
    if record["PipelineExecutionStatus"] == "Executing" and not (record.get("ExecutorPid") and process_alive(record["ExecutorPid"])):
        record["PipelineExecutionStatus"] = "Failed"
        record["FailureReason"] = record.get("FailureReason") or "the local executor stopped before the end"
