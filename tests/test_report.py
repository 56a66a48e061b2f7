"""The run report: facts read from an execution record and the step outputs in S3 (moto, in process),
pages that show them with every chart inline, escaping, failed runs and gaps, and SageMaker's
execution APIs turned into the same record (botocore's Stubber: moto lacks the steps listing).
"""
from __future__ import annotations

import base64
import io
import json
import re
import tarfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from flanops.pipelines.definition import EVALUATION_REPORT, NAMES
from flanops.pipelines.errors import FlanopsError
from flanops.pipelines.report import REPORT_FILES, REPORT_HTML, REPORT_MD, report_run, write_report
from flanops.pipelines.runfacts import collect, find_record, sagemaker_record

BUCKET = "report-test-bucket"
HOSTILE = "<script>alert('x')</script> | pipes | and\nnewlines"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def output(name: str, uri: str) -> dict:
    return {"OutputName": name, "S3Output": {"S3Uri": uri, "LocalPath": f"/opt/ml/processing/output/{name}",
                                             "S3UploadMode": "EndOfJob"}}


def definition() -> dict:
    def job(name, kind, depends=()):
        return {"Name": name, "Type": kind, "Arguments": {}, "DependsOn": list(depends)}

    return {"Version": "2020-12-01", "Parameters": [], "Steps": [
        job(NAMES.prepare, "Processing"), job(NAMES.finetune, "Training", [NAMES.prepare]),
        job("OptimizeDistill", "Processing", [NAMES.finetune]), job("OptimizeQuantize", "Processing", [NAMES.finetune]),
        job(NAMES.evaluate, "Processing", [NAMES.finetune, "OptimizeDistill", "OptimizeQuantize"]),
        {"Name": NAMES.gate, "Type": "Condition", "DependsOn": [NAMES.evaluate], "Arguments": {
            "Conditions": [], "IfSteps": [{"Name": NAMES.register, "Type": "RegisterModel", "Arguments": {}}],
            "ElseSteps": [{"Name": NAMES.fail, "Type": "Fail", "Arguments": {}}]}}]}


def metrics(rouge_l: float, p95: float, weights: int, **extra: float) -> dict:
    values = {"rouge1": rouge_l + 0.05, "rouge2": rouge_l - 0.2, "rougeL": rouge_l, "rougeLsum": rouge_l,
              "facts_recorded": 1, "facts_all_right": 0.9, "repetition_rate": 0.0,
              "parameters": 1_500_000, "weights_bytes": weights, "latency_p50_ms": p95 * 0.8,
              "latency_p95_ms": p95, "latency_ratio": p95 / 50.0, "flops_per_generated_token": 3_000_000, **extra}
    return {name: {"value": value} for name, value in values.items()}


EVALUATION = {
    "metrics": {**metrics(0.60, 60.0, 6_000_000, compression_ratio=1.0), "rougeL_drop": {"value": 0.0},
                "facts_all_right_drop": {"value": 0.0},
                "facts_recorded": {"value": 1, "note": "checked: the data records facts"}},
    "selected_variant": "finetuned",
    "selection": {"variant": "finetuned", "rule": "lowest p95 within 0.05 ROUGE-L of finetuned",
                  "candidates": [{"name": "finetuned", "rougeL": 0.6, "rougeL_drop": 0.0, "latency_p95_ms": 60.0,
                                  "why": "won"},
                                 {"name": "quantize", "rougeL": 0.59, "rougeL_drop": 0.01, "latency_p95_ms": 90.0,
                                  "why": "slower"}]},
    "baseline": {"metrics": metrics(0.10, 50.0, 6_000_000)},
    "model": {"metrics": metrics(0.60, 60.0, 6_000_000, compression_ratio=1.0), "card": {}},
    "comparisons": {"quantize": {"metrics": metrics(0.59, 90.0, 2_000_000, compression_ratio=3.0,
                                                    facts_all_right=0.25, repetition_rate=0.125),
                                 "card": {"method": "quantize", "quantization": {"method": "ct2-int8"}}}},
    "skipped": [{"name": "distill", "model_dir": "/opt/ml/processing/input/distill",
                 "reason": "OptimizationMethod is quantize"}],
}


@pytest.fixture
def aws(fake_aws_credentials):
    with mock_aws():
        session = boto3.Session(region_name="us-east-1")
        session.client("s3").create_bucket(Bucket=BUCKET)
        yield session


def put(session, key: str, body: bytes | str) -> str:
    session.client("s3").put_object(Bucket=BUCKET, Key=key, Body=body.encode() if isinstance(body, str) else body)
    return f"s3://{BUCKET}/{key}"


def model_archive(curve: dict) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in (("config.json", b"{}"), ("training_curve.json", json.dumps(curve).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def make_record(session, run_dir: Path, *, failed: bool = False) -> dict:
    """A record as the local executor writes it, and the outputs its properties point to."""
    curve = {"steps": 20, "curve": [{"step": s, "loss": 3.0 / s} for s in range(1, 21)] +
             [{"step": 10, "eval_loss": 0.5}, {"step": 20, "eval_loss": 0.4}]}
    put(session, "run/data/data_card.json", json.dumps({"counts": {"train": 200, "validation": 20, "test": 20},
                                                         "prompt_template": "Summarize:\n{dialogue}"}))
    put(session, "run/finetune/model.tar.gz", model_archive(curve))
    put(session, "run/evaluation/evaluation.json", json.dumps(EVALUATION))
    put(session, "run/evaluation/predictions.jsonl", "".join(json.dumps(
        {"id": f"t{i}", "dialogue": f"{HOSTILE}\n#Person1#: Ann here. Tuesday at 2 pm?\n#Person2#: Bob: yes.",
         "references": ["ref " + HOSTILE], "prediction": f"pred {i}: Ann and Bob meet on Monday at 2 pm",
         "baseline_prediction": "base", "quantize_prediction": "q",
         "facts": {"speakers": ["Ann", "Bob"], "day": "Tuesday", "time": "2 pm"}}) + "\n" for i in range(8)))
    steps = [
        {"StepName": NAMES.prepare, "StepType": "Processing", "StepStatus": "Succeeded", "DurationSeconds": 3.2,
         "CacheHitResult": {"SourcePipelineExecutionArn": "x"}, "Metadata": {}},
        {"StepName": NAMES.finetune, "StepType": "Training", "StepStatus": "Failed" if failed else "Succeeded",
         "DurationSeconds": 40.0, "Metadata": {}, "FailureReason": "out of memory" if failed else None},
    ]
    properties = {NAMES.prepare: {"ProcessingOutputConfig": {"Outputs": [output("data", f"s3://{BUCKET}/run/data")]}}}
    files = {}
    if not failed:
        properties[NAMES.finetune] = {"ModelArtifacts": {"S3ModelArtifacts": f"s3://{BUCKET}/run/finetune/model.tar.gz"}}
        properties[NAMES.evaluate] = {"ProcessingOutputConfig": {"Outputs": [
            output("evaluation", f"s3://{BUCKET}/run/evaluation")]}}
        files[f"{NAMES.evaluate}.{EVALUATION_REPORT}"] = EVALUATION
        steps += [{"StepName": "OptimizeDistill", "StepType": "Processing", "StepStatus": "Succeeded",
                   "DurationSeconds": 0.3, "Metadata": {}},
                  {"StepName": "OptimizeQuantize", "StepType": "Processing", "StepStatus": "Succeeded",
                   "DurationSeconds": 5.0, "Metadata": {}},
                  {"StepName": NAMES.evaluate, "StepType": "Processing", "StepStatus": "Succeeded",
                   "DurationSeconds": 12.0, "Metadata": {}},
                  {"StepName": NAMES.gate, "StepType": "Condition", "StepStatus": "Succeeded", "DurationSeconds": 0.0,
                   "Metadata": {"Condition": {"Outcome": "True"}}},
                  {"StepName": NAMES.register, "StepType": "RegisterModel", "StepStatus": "Succeeded",
                   "DurationSeconds": 0.3, "Metadata": {"RegisterModel": {
                       "Arn": "arn:aws:sagemaker:us-east-1:123456789012:model-package/g/1"}}}]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "definition.json").write_text(json.dumps(definition()), encoding="utf-8")
    return {"PipelineName": "p", "ExecutionId": "exec1",
            "PipelineExecutionArn": "arn:aws:sagemaker:us-east-1:123456789012:pipeline/p/execution/exec1",
            "PipelineExecutionStatus": "Failed" if failed else "Succeeded",
            "FailureReason": "FineTuneLoRA: out of memory" if failed else None, "RunDir": str(run_dir),
            "CreationTime": "2026-11-30T00:00:00+00:00", "LastModifiedTime": "2026-11-30T00:01:00+00:00",
            "Parameters": {"MinRougeL": 0.4, "MaxP95LatencyMs": 5000, "MaxLatencyRatio": 1.5, "MaxRougeLDrop": 0.05,
                           "MinFactAccuracy": 0.8, "MaxFactAccuracyDrop": 0.05, "MaxRepetitionRate": 0.02},
            "Steps": steps, "Properties": properties, "PropertyFiles": files}


def test_collect_reads_every_section_from_the_record_and_s3(aws, tmp_path):
    facts = collect(aws, make_record(aws, tmp_path / "run"), definition())
    assert facts.gaps == []
    assert [s["name"] for s in facts.steps][:4] == [NAMES.prepare, NAMES.finetune, "OptimizeDistill", "OptimizeQuantize"]
    assert facts.steps[0]["cached"] and not facts.steps[1]["cached"]
    assert {s["name"]: s["status"] for s in facts.steps}[NAMES.fail] == "not run"
    assert facts.data_card["counts"]["train"] == 200
    assert len(facts.curves["fine-tune (LoRA)"]["curve"]) == 22
    assert [(v.name, v.selected, v.method) for v in facts.variants] == [
        ("base", False, "un-tuned foundation model"), ("finetuned", True, "LoRA merged"),
        ("quantize", False, "ct2-int8")]
    assert facts.skipped == {"distill": "OptimizationMethod is quantize"}
    assert [s["name"] for s in facts.steps if s["skipped"]] == ["OptimizeDistill"], "ran, but was not chosen"
    assert len(facts.predictions) == 5 and facts.gate["passed"] is True
    assert facts.model_package_arn.endswith("model-package/g/1")
    record = make_record(aws, tmp_path / "run")
    record["PropertyFiles"] = {}   # a record without the gate's property file: evaluation.json comes from S3
    assert collect(aws, record, definition()).evaluation == EVALUATION


def test_the_pages_show_everything_inline_and_escape_what_the_data_says(aws, tmp_path):
    run_dir = tmp_path / "run"
    path = report_run(aws, make_record(aws, run_dir))
    html = path.read_text(encoding="utf-8")
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert len(sources) == 4, "pipeline graph, quality vs latency, variants, training curves"
    for source in sources:
        assert source.startswith("data:image/png;base64,"), "self-contained: nothing fetched when opened"
        assert base64.b64decode(source.split(",", 1)[1])[:8] == PNG_MAGIC
    assert "<script>alert" not in html and "&lt;script&gt;alert" in html
    for expected in ("PASSED", "finetuned ★", "ct2-int8", "3.00×", "FineTuneLoRA", "not run (OptimizationMethod",
                     "latency vs the base model", "MaxLatencyRatio", "1.20×"):
        assert expected in html, expected
    markdown = (run_dir / REPORT_MD).read_text(encoding="utf-8")
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(images) == 4 and all((run_dir / image).read_bytes()[:8] == PNG_MAGIC for image in images)
    assert "\\| pipes \\|" in markdown, "a | inside a cell does not split the table"
    header = next(line for line in markdown.splitlines() if line.startswith("| variant |"))
    rows = [line for line in markdown.splitlines() if line.startswith("| finetuned ★ |")]
    assert len(rows) == 1 and rows[0].count(" | ") == header.count(" | "), "one cell per column"


def test_a_failed_run_gets_a_report_that_says_what_is_missing(aws, tmp_path):
    run_dir = tmp_path / "run"
    record = make_record(aws, run_dir, failed=True)
    aws.client("s3").delete_object(Bucket=BUCKET, Key="run/data/data_card.json")
    html = report_run(aws, record).read_text(encoding="utf-8")
    assert "out of memory" in html and "No evaluation" in html and "The gate was not reached" in html
    assert "No data card" in html
    assert len(re.findall(r"<img ", html)) == 1, "only the pipeline graph"


def test_rewriting_replaces_the_report_and_leaves_no_temporary_files(aws, tmp_path):
    run_dir = tmp_path / "run"
    record = make_record(aws, run_dir)
    report_run(aws, record)
    (run_dir / REPORT_FILES / "stale.png").write_bytes(b"old")
    report_run(aws, record)
    assert not (run_dir / REPORT_FILES / "stale.png").exists()
    leftovers = [p.name for p in run_dir.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert {p.name for p in run_dir.iterdir()} == {"definition.json", REPORT_HTML, REPORT_MD, REPORT_FILES}


def test_unreadable_outputs_become_gaps_not_errors(aws, tmp_path):
    record = make_record(aws, tmp_path / "run")
    aws.client("s3").put_object(Bucket=BUCKET, Key="run/finetune/model.tar.gz", Body=b"not a tarball")
    facts = collect(aws, record, definition())
    assert "fine-tune (LoRA)" not in facts.curves
    assert len(facts.gaps) == 1 and facts.gaps[0].startswith("fine-tune curve: ReadError")
    write_report(facts, tmp_path / "run")
    assert "fine-tune curve: ReadError" in (tmp_path / "run" / REPORT_HTML).read_text(encoding="utf-8")


def test_find_record_names_what_is_wrong(tmp_path):
    with pytest.raises(FlanopsError, match="holds no summary.json"):
        find_record(tmp_path, "p", str(tmp_path))
    with pytest.raises(FlanopsError, match="is not a folder"):
        find_record(tmp_path, "p", "no/such/folder")
    with pytest.raises(FlanopsError, match="exec-missing"):
        find_record(tmp_path, "p", "exec-missing")


def test_a_sagemaker_execution_becomes_the_same_record(aws, tmp_path):
    """describe/list calls of a SageMaker execution → the record collect() reads (outputs in moto S3)."""
    local = make_record(aws, tmp_path / "local")
    arn = local["PipelineExecutionArn"]
    sagemaker = boto3.Session(region_name="us-east-1").client("sagemaker")
    start = datetime(2026, 11, 30, tzinfo=timezone.utc)
    job = "arn:aws:sagemaker:us-east-1:123456789012:{}/{}"
    with Stubber(sagemaker) as stub:
        stub.add_response("describe_pipeline_execution", {"PipelineExecutionArn": arn,
                                                          "PipelineExecutionStatus": "Succeeded"})
        stub.add_response("describe_pipeline_definition_for_execution", {"PipelineDefinition": json.dumps(definition())})
        stub.add_response("list_pipeline_execution_steps", {"PipelineExecutionSteps": [
            {"StepName": NAMES.prepare, "StepStatus": "Succeeded", "StartTime": start,
             "EndTime": start + timedelta(seconds=30), "Metadata": {"ProcessingJob": {"Arn": job.format("processing-job", "prep")}}},
            {"StepName": NAMES.finetune, "StepStatus": "Succeeded", "StartTime": start,
             "EndTime": start + timedelta(seconds=90), "Metadata": {"TrainingJob": {"Arn": job.format("training-job", "ft")}}},
            {"StepName": NAMES.evaluate, "StepStatus": "Succeeded", "StartTime": start,
             "EndTime": start + timedelta(seconds=20), "Metadata": {"ProcessingJob": {"Arn": job.format("processing-job", "ev")}}},
            {"StepName": NAMES.gate, "StepStatus": "Succeeded", "Metadata": {"Condition": {"Outcome": "True"}}},
        ]})
        stub.add_response("list_pipeline_parameters_for_execution",
                          {"PipelineParameters": [{"Name": "MinRougeL", "Value": "0.4"}]})
        for name, step in (("prep", NAMES.prepare), ("ev", NAMES.evaluate)):
            stub.add_response("describe_processing_job", {
                "ProcessingJobName": name, "ProcessingJobArn": job.format("processing-job", name),
                "ProcessingResources": {"ClusterConfig": {"InstanceCount": 1, "InstanceType": "ml.m5.xlarge",
                                                          "VolumeSizeInGB": 30}},
                "AppSpecification": {"ImageUri": "image"}, "ProcessingJobStatus": "Completed",
                "CreationTime": start, "ProcessingOutputConfig": local["Properties"][step]["ProcessingOutputConfig"]},
                {"ProcessingJobName": name})
            if name == "prep":
                stub.add_response("describe_training_job", {
                    "TrainingJobName": "ft", "TrainingJobArn": job.format("training-job", "ft"),
                    "ModelArtifacts": local["Properties"][NAMES.finetune]["ModelArtifacts"],
                    "TrainingJobStatus": "Completed", "SecondaryStatus": "Completed",
                    "AlgorithmSpecification": {"TrainingInputMode": "File"},
                    "ResourceConfig": {"InstanceCount": 1, "InstanceType": "ml.m5.xlarge", "VolumeSizeInGB": 30},
                    "StoppingCondition": {}, "CreationTime": start}, {"TrainingJobName": "ft"})

        class Session:   # sagemaker stubbed, S3 from moto
            region_name = "us-east-1"

            def client(self, name):
                return sagemaker if name == "sagemaker" else aws.client(name)

        record, got_definition = sagemaker_record(Session(), arn, tmp_path / "cloud")
    assert record["ExecutionId"] == "exec1" and record["Parameters"] == {"MinRougeL": "0.4"}
    assert [s["DurationSeconds"] for s in record["Steps"]] == [30.0, 90.0, 20.0, None]
    assert record["PropertyFiles"][f"{NAMES.evaluate}.{EVALUATION_REPORT}"]["selected_variant"] == "finetuned"
    facts = collect(aws, record, got_definition)
    assert facts.gaps == [] and facts.data_card and "fine-tune (LoRA)" in facts.curves
    assert [v.name for v in facts.variants] == ["base", "finetuned", "quantize"]
    assert facts.gate["variant"] == "finetuned"


def test_a_failed_write_leaves_no_partial_report(aws, tmp_path, monkeypatch):
    """Whatever stops the write (a full disk: ENOSPC), the old report stays and no temporary file is left."""
    import errno
    import os

    run_dir = tmp_path / "run"
    record = make_record(aws, run_dir)
    report_run(aws, record)
    before = (run_dir / REPORT_HTML).read_bytes()
    real_replace = os.replace

    def full_disk(source, destination):
        if str(destination).endswith(REPORT_HTML):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(FlanopsError, match="No space left on device"):
        report_run(aws, record)
    assert (run_dir / REPORT_HTML).read_bytes() == before
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------- facts, repetition, data card, chart
def test_the_variants_table_has_facts_and_repetition_and_the_samples_mark_wrong_facts(aws, tmp_path):
    run_dir = tmp_path / "run"
    html = report_run(aws, make_record(aws, run_dir)).read_text(encoding="utf-8")
    markdown = (run_dir / REPORT_MD).read_text(encoding="utf-8")
    header = next(line for line in markdown.splitlines() if line.startswith("| variant |"))
    assert "| all facts right | repeating |" in header
    quantize = next(line for line in markdown.splitlines() if line.startswith("| quantize | ct2-int8 |"))
    assert "| 25.0% | 12.5% |" in quantize
    assert "<th>all facts right</th>" in html and "25.0%" in html and "12.5%" in html
    # the registered model's summary says Monday where the dialogue says Tuesday: marked in the dialogue and beside it
    assert '<mark class="missing">Tuesday</mark>' in html and '<mark class="stated">2 pm</mark>' in html
    assert '<mark class="stated">Ann</mark>' in html
    assert "✗ day: Tuesday (not stated)" in html and "✓ time: 2 pm" in html
    assert "**Tuesday** ✗" in markdown and "**2 pm**" in markdown and "✗ day Tuesday" in markdown
    assert "<script>alert" not in html, "marking the facts keeps the dialogue escaped"


def test_a_gate_on_data_without_facts_says_the_fact_conditions_were_skipped(aws, tmp_path):
    record = make_record(aws, tmp_path / "run")
    evaluation = json.loads(json.dumps(EVALUATION))
    note = "skipped: the data records no facts (e.g. DialogSum)"
    evaluation["metrics"].update({"facts_recorded": {"value": 0, "note": note}, "facts_all_right": {"value": 0.0},
                                  "facts_all_right_drop": {"value": 0.0}, "repetition_rate": {"value": 0.5}})
    for entry in (evaluation["baseline"], evaluation["model"], *evaluation["comparisons"].values()):
        entry["metrics"]["facts_recorded"] = {"value": 0}
        del entry["metrics"]["facts_all_right"]
    record["PropertyFiles"][f"{NAMES.evaluate}.{EVALUATION_REPORT}"] = evaluation
    facts = collect(aws, record, definition())
    conditions = {c["parameter"]: c for c in facts.gate["conditions"]}
    assert conditions["MinFactAccuracy"]["skipped"] == note and conditions["MinFactAccuracy"]["measured"] is None
    assert conditions["MaxFactAccuracyDrop"]["skipped"] == note
    assert conditions["MaxRepetitionRate"]["passed"] is False and not conditions["MaxRepetitionRate"]["skipped"]
    write_report(facts, tmp_path / "run")
    markdown = (tmp_path / "run" / REPORT_MD).read_text(encoding="utf-8")
    assert f"| all facts right | – | min 0.8 | MinFactAccuracy | {note} |" in markdown
    assert "| repeating summaries | 0.5 | max 0.02 | MaxRepetitionRate | FAILED |" in markdown
    finetuned = next(line for line in markdown.splitlines() if line.startswith("| finetuned ★ |"))
    assert "| 60.0 | – | 0.0% |" in finetuned, "no facts figure where none are recorded"


def test_the_data_card_reads_as_rows_not_json():
    from flanops.pipelines.report import data_card_rows

    card = {"source": {"kind": "local", "input": "data/", "files": ["a.jsonl", "b.jsonl"], "repeats_dropped": 0,
                       "splits_from": "pooled"},
            "seed": 0, "counts": {"train": 20, "validation": 2, "test": 2}, "prompt_template": "Summarize:\n{dialogue}",
            "tokenizer": {"name": "regex", "unit": "approximate tokens", "approximate": True},
            "max_source_length": 512, "max_target_length": 128, "overlap_with_train": {"validation": 0, "test": 1},
            "token_lengths": {"train": {"source": {"p50": 40, "p90": 60, "p95": 61, "p99": 70, "max": 80},
                                        "target": {"p50": 9, "p90": 12, "p95": 12, "p99": 14, "max": 15}}},
            "truncated": {"train": {"source": 1, "target": 0}},
            "unseen_in_train": {"test": {"intent_day_pair": 0.25, "speaker_name": 0.5}}}
    rows = dict(data_card_rows(card))
    assert rows["source"] == "local data/" and rows["source: files"] == "a.jsonl, b.jsonl"
    assert rows["examples"] == "train 20, validation 2, test 2"
    assert rows["train source tokens"] == "p50 40, p90 60, p95 61, p99 70, max 80"
    assert rows["truncated (source / target)"] == "train 1 / 0"
    assert rows["overlap with train"] == "validation 0, test 1"
    assert rows["unseen in train"] == "test (intent day pair 0.25, speaker name 0.5)"
    assert not [value for value in rows.values() if "{" in value.replace("{dialogue}", "") or '"' in value]


def test_point_labels_in_the_quality_vs_latency_chart_do_not_overlap():
    """Variants with almost the same latency and ROUGE-L (as quantize and the fine-tuned model often have)."""
    from flanops.pipelines.report import label_box, pyplot, tradeoff_figure
    from flanops.pipelines.runfacts import RunFacts, Variant

    near = [("base", 50.0, 0.20), ("finetuned", 60.0, 0.600), ("quantize", 61.0, 0.601), ("bf16", 60.5, 0.599),
            ("distill", 62.0, 0.600), ("prune", 59.5, 0.602)]
    facts = RunFacts(execution={}, steps=[], graph=None, variants=[
        Variant(name, {"latency_p95_ms": p95, "rougeL": rouge_l}, selected=name == "quantize")
        for name, p95, rouge_l in near], gate={"thresholds": {"MinRougeL": 0.4, "MaxP95LatencyMs": 1000}})
    figure, labels = tradeoff_figure(facts)
    renderer = figure.canvas.get_renderer()
    boxes = [label_box(label, renderer) for label in labels]
    pyplot().close(figure)
    assert [label.get_text() for label in labels] == [name for name, *_ in near]
    for i, box in enumerate(boxes):
        for j in range(i + 1, len(boxes)):
            assert not box.overlaps(boxes[j]), f"{labels[i].get_text()} overlaps {labels[j].get_text()}"
