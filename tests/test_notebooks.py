"""The Studio notebooks run top to bottom (papermill, a real Jupyter kernel) against embedded AWS,
with quick settings through their parameter cell, in order: 01 runs the pipeline, 02 upserts and
starts the same one (its jobs come from the cache), 03 approves, deploys, invokes and reads the
data capture, 04 runs distill, quantize and prune side by side. They share test_pipeline_local's
FLANOPS_HOME and run after it (conftest), so 01's jobs come from that module's cache when it ran.
"""
from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import AWS_VARIABLES

papermill = pytest.importorskip("papermill", reason="the test extra installs papermill")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
ORDER = ["01_quickstart.ipynb", "02_sagemaker_pipeline.ipynb", "03_deploy_and_monitor.ipynb",
         "04_optimization_tradeoffs.ipynb"]
# As test_pipeline_local's FAST run: seconds per job instead of minutes; a gate everything passes
QUICK = {"steps.prepare.train_size": 200, "steps.prepare.test_size": 20,
         "steps.finetune.max_steps": 10, "steps.evaluate.max_examples": 20, "steps.evaluate.speed_inputs": 1,
         "steps.evaluate.speed_repeats": 1, "MinRougeL": 0.0, "MaxP95LatencyMs": 600000,
         "MinFactAccuracy": 0.0, "MaxRepetitionRate": 1.0}


@pytest.fixture(scope="module")
def workspace(embedded_root) -> Iterator[Path]:
    """conftest's shared FLANOPS_HOME: after test_pipeline_local, whose quick run fills the job cache."""
    root = embedded_root / "notebooks"
    root.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name in AWS_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("FLANOPS_HOME", str(embedded_root / "home"))   # the kernels inherit it
        monkeypatch.setenv("MPLBACKEND", "Agg")
        yield root


def execute(workspace: Path, name: str, **parameters) -> dict:
    """Run one notebook in a fresh kernel with ``parameters``; the executed notebook as JSON."""
    output = workspace / f"executed-{name}"
    papermill.execute_notebook(str(NOTEBOOKS / name), str(output), parameters=parameters, cwd=str(workspace),
                               kernel_name="python3", progress_bar=False, request_save_on_cell_execute=False)
    return json.loads(output.read_text(encoding="utf-8"))


def outputs(notebook: dict, kind: str) -> list:
    """Every output of the executed notebook's code cells with this MIME type (or stream text)."""
    found = []
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            if kind == "stream" and output["output_type"] == "stream":
                found.append("".join(output["text"]))
            elif kind in output.get("data", {}):
                data = output["data"][kind]
                found.append("".join(data) if isinstance(data, list) else data)
    return found


def test_notebooks_are_committed_without_outputs_and_take_parameters():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == ORDER
    for name in ORDER:
        notebook = json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))
        code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
        assert all(not c["outputs"] and c["execution_count"] is None for c in code), f"{name} has outputs"
        tagged = [c for c in code if "parameters" in c["metadata"].get("tags", [])]
        assert len(tagged) == 1 and "CONFIG" in "".join(tagged[0]["source"]), f"{name}: one parameters cell"
        source = "\n".join("".join(c["source"]) for c in code)
        assert "import flanops.pipelines.api as flanops" in source, f"{name} drives the package"
        assert not re.search(r"^\s*(def|class) ", source, re.MULTILINE), f"{name} defines logic of its own"


def test_01_quickstart_runs_the_pipeline_shows_the_report_and_invokes_the_endpoint(workspace):
    run_dir = workspace / "runs" / "quickstart"
    notebook = execute(workspace, ORDER[0], PARAMS=QUICK, OUTPUT_DIR=str(run_dir))
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["status"] == "Succeeded" and summary["model_package_arn"]
    assert (run_dir / "report.html").is_file() and (run_dir / "report.md").is_file()
    images = outputs(notebook, "image/png")
    assert len(images) >= 4, "pipeline, curves, variants and quality-vs-latency charts inline"
    assert all(base64.b64decode(image)[:8] == b"\x89PNG\r\n\x1a\n" for image in images)
    tables = outputs(notebook, "text/html")
    assert any("finetuned" in table and "p95 ms" in table for table in tables), "the variants table"
    text = "\n".join(outputs(notebook, "stream"))
    assert re.search(r"summary: \S+", text), text[-2000:]


def test_02_sagemaker_pipeline_detects_no_studio_and_runs_on_embedded_aws(workspace):
    run_dir = workspace / "runs" / "pipeline"
    notebook = execute(workspace, ORDER[1], PARAMS=QUICK, OUTPUT_DIR=str(run_dir))
    text = "\n".join(outputs(notebook, "stream"))
    assert "target: embedded AWS" in text
    assert outputs(notebook, "image/png"), "the definition's graph"
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["status"] == "Succeeded"
    jobs = [s for s in summary["steps"] if s["type"] in ("Processing", "Training")]
    assert jobs and all(s["cached"] for s in jobs), "01's run left every job in the cache"
    assert summary["execution_id"] in text, "the executions listing shows it"


def test_03_deploy_and_monitor_approves_deploys_invokes_and_reads_the_capture(workspace):
    notebook = execute(workspace, ORDER[2], PARAMS=QUICK, REQUESTS=6)
    text = "\n".join(outputs(notebook, "stream"))
    assert "approved arn:aws:sagemaker:" in text
    captured = re.search(r"(\d+) records captured so far", text)
    assert captured and int(captured.group(1)) >= 6, text[-3000:]
    # staging captures every request: the newest six records are this notebook's, in order, with their answers
    from flanops.pipelines.api import captured_records, sample_dialogues

    newest = captured_records("staging")[-6:]
    assert [json.loads(r["captureData"]["endpointInput"]["data"])["inputs"] for r in newest] == sample_dialogues(6)
    answers = [json.loads(r["captureData"]["endpointOutput"]["data"])[0]["generated_text"] for r in newest]
    assert all(answer in text for answer in answers), "the captured responses are the ones the notebook printed"
    tables = outputs(notebook, "text/html")
    assert any("Approved" in t and "PendingManualApproval" in t for t in tables), "versions compared"
    assert any("rougeL" in t for t in tables), "their ModelQuality metrics"


def test_04_optimization_tradeoffs_measures_every_variant(workspace):
    run_dir = workspace / "runs" / "tradeoffs"
    quick = {**QUICK, "steps.distill.max_steps": 10, "steps.prune.recovery_steps": 5, "steps.evaluate.max_examples": 8}
    notebook = execute(workspace, ORDER[3], PARAMS=quick, OUTPUT_DIR=str(run_dir))
    tables = outputs(notebook, "text/html")
    assert any(all(v in t for v in ("distill", "quantize", "prune", "finetuned", "base")) for t in tables)
    assert len(outputs(notebook, "image/png")) >= 3, "quality vs latency, variants, training curves"
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "distillation" in html or "distill" in html
    assert os.path.getsize(run_dir / "report.html") > 50_000, "charts inline"
