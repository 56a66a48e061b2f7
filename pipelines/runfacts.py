"""What a run's report shows, found and read: the execution record (local, or SageMaker's), the
steps' outputs in S3, the variants evaluate.py measured and the gate's outcome."""
from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .definition import EVALUATION_REPORT, NAMES
from .errors import FlanopsError
from .stepgraph import StepGraph
from .records import load_execution, pipeline_of
from .s3 import split_s3_uri

SAMPLE_PREDICTIONS = 5
BASELINE, FINETUNED = "base", "finetuned"   # row names in the variants table (evaluate.py calls them baseline/model)


@dataclass
class Variant:
    name: str
    metrics: dict[str, float]         # evaluation.json's metrics.<name>.value, flattened
    method: str = ""                  # what made it (model card), e.g. "ct2-int8"
    selected: bool = False


@dataclass
class RunFacts:
    execution: dict                   # id, arn, pipeline, status, failure_reason, parameters, run_dir
    steps: list[dict]                 # name, type, status, seconds, cached, failure_reason (every defined step)
    graph: StepGraph
    data_card: dict | None = None
    curves: dict[str, dict] = field(default_factory=dict)   # "fine-tune" / "distillation" → training_curve.json
    evaluation: dict | None = None
    variants: list[Variant] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)    # optimization branches not chosen → why
    predictions: list[dict] = field(default_factory=list)
    gate: dict | None = None
    model_package_arn: str | None = None
    deployment: dict | None = None
    gaps: list[str] = field(default_factory=list)            # what could not be read, and why


# ----------------------------------------------------------------------------- finding the execution
def find_record(home: Path, pipeline_name: str, run_or_execution: str) -> dict:
    """The local execution record for a run folder (holding summary.json), an execution id or an ARN."""
    folder = Path(run_or_execution)
    if folder.is_dir():
        summary_file = folder / "summary.json"
        if not summary_file.is_file():
            raise FlanopsError(f"{folder} holds no summary.json: give a run folder that `flanops run` wrote, "
                               "or an execution id or ARN (`flanops executions` lists them)")
        arn = json.loads(summary_file.read_text(encoding="utf-8"))["execution_arn"]
        return load_execution(home, pipeline_of(arn), arn)
    if "/" in run_or_execution and not run_or_execution.startswith("arn:"):
        raise FlanopsError(f"{run_or_execution} is not a folder; give a run folder, an execution id or an ARN")
    if run_or_execution.startswith("arn:") and ":pipeline/" in run_or_execution:
        pipeline_name = pipeline_of(run_or_execution)
    return load_execution(home, pipeline_name, run_or_execution)


def sagemaker_record(session, execution_arn: str, run_dir: Path) -> tuple[dict, dict]:
    """(record, definition) of an execution on SageMaker, in the local executor's record shape."""
    sagemaker = session.client("sagemaker")
    try:
        described = sagemaker.describe_pipeline_execution(PipelineExecutionArn=execution_arn)
        definition = json.loads(sagemaker.describe_pipeline_definition_for_execution(
            PipelineExecutionArn=execution_arn)["PipelineDefinition"])
        steps = [step for page in sagemaker.get_paginator("list_pipeline_execution_steps").paginate(
            PipelineExecutionArn=execution_arn, SortOrder="Ascending") for step in page["PipelineExecutionSteps"]]
        parameters = {p["Name"]: p["Value"] for page in sagemaker.get_paginator(
            "list_pipeline_parameters_for_execution").paginate(PipelineExecutionArn=execution_arn)
            for p in page["PipelineParameters"]}
    except sagemaker.exceptions.ResourceNotFound:
        raise FlanopsError(f"no pipeline execution {execution_arn} in this account and region "
                           "(`flanops executions --aws` lists them)") from None
    graph = StepGraph.of(definition)
    record = {"PipelineName": pipeline_of(execution_arn),
              "PipelineExecutionArn": execution_arn, "ExecutionId": execution_arn.rsplit("/", 1)[-1],
              "PipelineExecutionStatus": described["PipelineExecutionStatus"],
              "FailureReason": described.get("FailureReason"), "RunDir": str(run_dir),
              "CreationTime": str(described.get("CreationTime", "")),
              "LastModifiedTime": str(described.get("LastModifiedTime", "")),
              "Parameters": parameters, "Steps": [], "Properties": {}, "PropertyFiles": {}}
    for step in steps:
        name, metadata = step["StepName"], step.get("Metadata", {})
        started, ended = step.get("StartTime"), step.get("EndTime")
        record["Steps"].append({
            "StepName": name, "StepType": graph.steps.get(name, {}).get("Type", ""), "StepStatus": step["StepStatus"],
            "DurationSeconds": round((ended - started).total_seconds(), 1) if started and ended else None,
            "CacheHitResult": step.get("CacheHitResult"), "FailureReason": step.get("FailureReason"),
            "Metadata": metadata})
        if "ProcessingJob" in metadata:
            record["Properties"][name] = sagemaker.describe_processing_job(
                ProcessingJobName=metadata["ProcessingJob"]["Arn"].rsplit("/", 1)[-1])
        elif "TrainingJob" in metadata:
            record["Properties"][name] = sagemaker.describe_training_job(
                TrainingJobName=metadata["TrainingJob"]["Arn"].rsplit("/", 1)[-1])
    if NAMES.evaluate in record["Properties"]:
        uri = processing_output_uri(record["Properties"][NAMES.evaluate], "evaluation")
        evaluation = loads_json(read_s3_file(session.client("s3"), uri, "evaluation.json")) if uri else None
        if evaluation:
            record["PropertyFiles"][f"{NAMES.evaluate}.{EVALUATION_REPORT}"] = evaluation
    return record, definition


# ----------------------------------------------------------------------------- reading outputs
def processing_output_uri(properties: dict, output_name: str) -> str | None:
    for output in properties.get("ProcessingOutputConfig", {}).get("Outputs", []):
        if output["OutputName"] == output_name:
            return output["S3Output"]["S3Uri"]
    return None


def read_s3_file(s3, prefix_uri: str, name: str) -> bytes | None:
    bucket, key = split_s3_uri(f"{prefix_uri.rstrip('/')}/{name}")
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None


def read_archive_members(s3, archive_uri: str, names: set[str]) -> dict[str, bytes]:
    """Top-level files ``names`` of a model.tar.gz in S3, streamed: it stops once it has them all."""
    bucket, key = split_s3_uri(archive_uri)
    body = s3.get_object(Bucket=bucket, Key=key)["Body"]
    found: dict[str, bytes] = {}
    with tarfile.open(fileobj=body, mode="r|gz") as archive:
        for member in archive:
            name = member.name.removeprefix("./")
            if member.isfile() and name in names:
                found[name] = archive.extractfile(member).read()
                if len(found) == len(names):
                    break
    return found


def loads_json(data: bytes | None) -> Any:
    return json.loads(data) if data is not None else None


def flat_metrics(entries: dict) -> dict[str, float]:
    return {name: entry["value"] for name, entry in entries.items() if isinstance(entry, dict) and "value" in entry}


def variants_of(evaluation: dict) -> tuple[list[Variant], dict[str, str]]:
    """Base, fine-tuned and every optimized variant, as evaluate.py measured them side by side."""
    selected = evaluation.get("selected_variant", FINETUNED)
    finetuned = evaluation["model"].get("metrics") or evaluation["metrics"]   # without selection: top level
    rows = [Variant(BASELINE, {**flat_metrics(evaluation["baseline"]["metrics"]), "compression_ratio": 1.0},
                    "un-tuned foundation model"),
            Variant(FINETUNED, flat_metrics(finetuned), "LoRA merged", selected == FINETUNED)]
    for name, entry in evaluation.get("comparisons", {}).items():
        rows.append(Variant(name, flat_metrics(entry["metrics"]), method_label(entry.get("card") or {}),
                            selected == name))
    skipped = {entry["name"]: str(entry.get("reason", "")) for entry in evaluation.get("skipped") or []}
    return rows, skipped


def method_label(card: dict) -> str:
    """What made a variant, from its model card: "ct2-int8", "structured pruning 50% (ffn)", …"""
    if isinstance(card.get("quantization"), dict):
        return str(card["quantization"].get("method", "quantized"))
    if isinstance(card.get("pruning"), dict):
        pruning = card["pruning"]
        amount = f" {pruning['amount']:.0%}" if isinstance(pruning.get("amount"), (int, float)) else ""
        target = f" ({pruning['target']})" if pruning.get("target") else ""
        return f"{pruning.get('method', '')} pruning{amount}{target}".strip()
    return str(card.get("method", ""))


def collect(session, record: dict, definition: dict) -> RunFacts:
    """What the report shows, read from the record and the steps' outputs; gaps are noted, not fatal."""
    s3 = session.client("s3")
    graph = StepGraph.of(definition)
    ran = {s["StepName"]: s for s in record["Steps"]}
    steps = []
    for name in graph.order():
        step = ran.get(name)
        steps.append({"name": name, "type": graph.steps[name]["Type"],
                      "status": step["StepStatus"] if step else "not run",
                      "seconds": step.get("DurationSeconds") if step else None,
                      "cached": bool(step and step.get("CacheHitResult")),
                      "failure_reason": step.get("FailureReason") if step else None, "skipped": False})
    facts = RunFacts(
        execution={"id": record["ExecutionId"], "arn": record["PipelineExecutionArn"],
                   "pipeline": record["PipelineName"], "status": record["PipelineExecutionStatus"],
                   "failure_reason": record.get("FailureReason"), "parameters": record["Parameters"],
                   "run_dir": record.get("RunDir"), "created": record.get("CreationTime"),
                   "ended": record.get("LastModifiedTime")},
        steps=steps, graph=graph, gate=gate_facts(record))
    properties = record.get("Properties", {})

    def fetch(what: str, read):
        try:
            return read()
        except Exception as err:   # noqa: BLE001 - a report with a gap beats no report; the gap is shown
            facts.gaps.append(f"{what}: {type(err).__name__}: {err}")
            return None

    if NAMES.prepare in properties:
        uri = processing_output_uri(properties[NAMES.prepare], "data")
        facts.data_card = fetch("data card", lambda: loads_json(read_s3_file(s3, uri, "data_card.json")))
    if NAMES.finetune in properties:
        uri = properties[NAMES.finetune]["ModelArtifacts"]["S3ModelArtifacts"]
        members = fetch("fine-tune curve", lambda: read_archive_members(s3, uri, {"training_curve.json"})) or {}
        if "training_curve.json" in members:
            facts.curves["fine-tune (LoRA)"] = json.loads(members["training_curve.json"])
    distill = NAMES.optimize("distill")
    if distill in properties:
        uri = processing_output_uri(properties[distill], "model")
        curve = fetch("distillation curve", lambda: loads_json(read_s3_file(s3, uri, "training_curve.json")))
        if curve:
            facts.curves["distillation"] = curve
    if NAMES.evaluate in properties:
        uri = processing_output_uri(properties[NAMES.evaluate], "evaluation")
        # the gate's PropertyFile is evaluation.json itself: read it from S3 only when the record lacks it
        facts.evaluation = record.get("PropertyFiles", {}).get(f"{NAMES.evaluate}.{EVALUATION_REPORT}") or fetch(
            "evaluation", lambda: loads_json(read_s3_file(s3, uri, "evaluation.json")))
        lines = fetch("predictions", lambda: read_s3_file(s3, uri, "predictions.jsonl")) or b""
        facts.predictions = [json.loads(line) for line in lines.decode("utf-8").splitlines()[:SAMPLE_PREDICTIONS]]
    if facts.evaluation:
        facts.variants, facts.skipped = variants_of(facts.evaluation)
        for step in facts.steps:   # an optimize branch that was not chosen ran, but made no model
            step["skipped"] = any(step["name"] == NAMES.optimize(variant) for variant in facts.skipped)
    register = ran.get(NAMES.register)
    if register and register["StepStatus"] == "Succeeded":
        facts.model_package_arn = register["Metadata"]["RegisterModel"]["Arn"]
    summary_file = Path(record.get("RunDir", "")) / "summary.json"
    if summary_file.is_file():
        facts.deployment = json.loads(summary_file.read_text(encoding="utf-8")).get("deployment")
    return facts


def run_definition(record: dict) -> dict:
    """The definition a local execution ran, kept in its run folder."""
    definition_file = Path(record["RunDir"]) / "definition.json"
    if not definition_file.is_file():
        raise FlanopsError(f"the run folder {record['RunDir']} of execution {record['ExecutionId']} has no "
                           "definition.json (moved or deleted?); the report is written into the run folder")
    return json.loads(definition_file.read_text(encoding="utf-8"))



# ----------------------------------------------------------------------------- the gate
def gate_facts(record: dict) -> dict | None:
    """The gate's inputs and outcome, from the evaluation report and the condition step."""
    from .definition import EVALUATION_REPORT, NAMES, gate_paths
    from .expressions import json_path
    from .tables import GATE

    report_file = record["PropertyFiles"].get(f"{NAMES.evaluate}.{EVALUATION_REPORT}")
    if report_file is None:
        return None
    measured = {}
    for name, path in gate_paths().items():
        try:
            measured[name] = json_path(report_file, path, "evaluation.json")
        except FlanopsError:
            measured[name] = None
    gate_step = next((s for s in record["Steps"] if s["StepName"] == NAMES.gate), None)
    outcome = gate_step["Metadata"].get("Condition", {}).get("Outcome") if gate_step else None
    parameters = record["Parameters"]
    selection = report_file.get("selection", {})
    conditions = []
    for condition in GATE:
        value, threshold = measured[condition.metric], parameters.get(condition.parameter)
        # skipped where evaluation.json says it does not apply (e.g. no facts recorded): the definition's Or holds
        skipped = measured[f"{condition.applies_when}_note"] if condition.applies_when and \
            measured[condition.applies_when] == 0 else None
        if skipped:
            passed = True
        else:
            passed = None if value is None or threshold is None else condition.passed(float(value), float(threshold))
        conditions.append({"label": condition.label, "metric": condition.metric, "parameter": condition.parameter,
                           "bound": condition.bound(), "unit": condition.unit,
                           "measured": None if skipped else value, "skipped": skipped,
                           "threshold": threshold, "passed": passed})
    candidates = selection.get("candidates")
    # the variant choice's candidates, in the gate's figures that evaluate.py recorded for them
    candidate_columns = [{"metric": c.metric, "label": c.label, "unit": c.unit} for c in GATE
                         if any(c.metric in row for row in candidates or [])]
    return {"passed": outcome == "True" if outcome else None, "variant": measured["variant"],
            "measured": {k: v for k, v in measured.items() if k != "variant" and not k.endswith("_note")},
            "thresholds": {condition.parameter: parameters.get(condition.parameter) for condition in GATE},
            "conditions": conditions, "why": selection.get("rule"), "candidates": candidates,
            "candidate_columns": candidate_columns}
