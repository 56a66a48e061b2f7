"""RELIABILITY.md, written by the tests that prove each case (a pytest plugin; conftest loads it).

A test takes the ``reliability`` fixture and records what it observed for a case of
:data:`CASES`: ``reliability.record("data.empty", "exit 2: … is empty; nothing written")``.
A test that may fail before it gets to record (a long one) also says up front which cases it
proves, ``@pytest.mark.proves("load.over_limits")``, so its failure shows against them.
Workers append their records to files in a folder the controller made. Only when asked,
``pytest --write-reliability`` (what ``.ci/run`` runs), and only when the whole suite ran, the
controller writes ``RELIABILITY.md`` beside ``pyproject.toml``: every case, in the issue's order,
with what the test saw and whether the test passed. A case no test recorded shows as "not run",
so a missing proof cannot hide. ``FLANOPS_RELIABILITY_MD=PATH`` writes the same page to PATH after
any run. A plain ``pytest`` never rewrites the tracked file.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

RECORDS_ENV = "FLANOPS_RELIABILITY_RECORDS"
OUT_ENV = "FLANOPS_RELIABILITY_MD"
WRITE_OPTION = "--write-reliability"
SECTIONS = ("Bad input", "Faults", "Load", "Security")

# (id, section, group, case as the issue states it); the writer keeps this order.
CASES: list[tuple[str, str, str, str]] = [
    ("data.empty", "Bad input", "Data", "empty file"),
    ("data.truncated", "Bad input", "Data", "truncated file"),
    ("data.non_utf8", "Bad input", "Data", "non-UTF-8 text"),
    ("data.wrong_columns", "Bad input", "Data", "wrong columns"),
    ("data.duplicate_ids", "Bad input", "Data", "duplicate ids"),
    ("data.huge_dialogue", "Bad input", "Data", "a single 5 MB dialogue"),
    ("data.wrong_format", "Bad input", "Data", "a file that is not the format its extension says"),
    ("data.missing_s3", "Bad input", "Data", "an S3 URI that does not exist"),
    ("data.bad_facts", "Bad input", "Data", "facts that are not a slot → value mapping, or a value the dialogue "
                                            "does not contain"),
    ("config.unknown_key", "Bad input", "Config and CLI", "unknown keys"),
    ("config.wrong_type", "Bad input", "Config and CLI", "wrong types"),
    ("config.rank_zero", "Bad input", "Config and CLI", "LoRA rank 0 / negative values"),
    ("config.temperature", "Bad input", "Config and CLI", "temperature ≤ 0"),
    ("config.sparsity", "Bad input", "Config and CLI", "sparsity ≥ 1"),
    ("config.unpassable_gate", "Bad input", "Config and CLI", "gate thresholds no model can pass (warned before running)"),
    ("config.unknown_model", "Bad input", "Config and CLI", "a model id not in the catalog and not a path"),
    ("model.missing_files", "Bad input", "Model folders", "missing files"),
    ("model.wrong_architecture", "Bad input", "Model folders", "wrong architecture"),
    ("model.corrupt_safetensors", "Bad input", "Model folders", "a corrupted safetensors file"),
    ("model.tar_escape", "Bad input", "Model folders", "a model.tar.gz with a path that escapes its folder"),
    ("endpoint.invalid_json", "Bad input", "Endpoint", "invalid JSON"),
    ("endpoint.content_type", "Bad input", "Endpoint", "wrong content type"),
    ("endpoint.empty_body", "Bad input", "Endpoint", "empty body"),
    ("endpoint.oversize_body", "Bad input", "Endpoint", "oversize body"),
    ("endpoint.huge_max_new_tokens", "Bad input", "Endpoint", "huge max_new_tokens"),
    ("endpoint.non_string_inputs", "Bad input", "Endpoint", "non-string inputs"),
    ("endpoint.thousand_inputs", "Bad input", "Endpoint", "1,000 inputs in one request"),
    ("fault.sigkill_resume", "Faults", "", "a step killed mid-write (SIGKILL), then --resume"),
    ("fault.embedded_aws_dies", "Faults", "", "the embedded AWS server dies mid-run, then a rerun"),
    ("fault.stack_update_rollback", "Faults", "", "a failed stack update (invalid instance type) while the endpoint serves"),
    ("fault.disk_full", "Faults", "", "disk full"),
    ("fault.read_only", "Faults", "", "read-only output folder"),
    ("load.concurrent_clients", "Load", "", "16 concurrent clients for 60 s against the local endpoint"),
    ("load.over_limits", "Load", "", "requests over the limits during the load"),
    ("security.iam", "Security", "", "IAM policies: only the S3 prefixes, logs and SageMaker actions needed"),
    ("security.kms", "Security", "", "optional KMS key for artifacts, data capture and endpoint volumes"),
    ("security.buckets", "Security", "", "buckets the tool creates block public access and require TLS"),
    ("security.network", "Security", "", "optional VPC config and network isolation (definition and template)"),
    ("security.secrets", "Security", "", "no secret in output, logs, reports or run records"),
    ("security.cfn_lint", "Security", "", "cfn-lint on every template"),
    ("security.python_lint", "Security", "", "security linter for the Python code"),
    ("security.iac_lint", "Security", "", "security linter for the templates"),
]
CASE_IDS = {case[0] for case in CASES}


def _append(folder: Path, record: dict) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(folder / f"{worker}.jsonl", "a", encoding="utf-8") as records:
        records.write(json.dumps(record) + "\n")


class Recorder:
    """What one test saw, appended to this worker's records file."""

    def __init__(self, nodeid: str, folder: Path | None):
        self.nodeid = nodeid
        self.folder = folder

    def record(self, case: str, result: str, **figures: float | int | str) -> None:
        if case not in CASE_IDS:
            raise KeyError(f"{case!r} is not a case in tests/reliability.py CASES")
        if self.folder is None:
            return
        _append(self.folder, {"case": case, "result": result, "figures": figures, "test": self.nodeid})


@pytest.fixture
def reliability(request) -> Recorder:
    folder = os.environ.get(RECORDS_ENV)
    return Recorder(request.node.nodeid, Path(folder) if folder else None)


def _is_controller(config) -> bool:
    return not hasattr(config, "workerinput")


def pytest_addoption(parser):
    parser.addoption(WRITE_OPTION, action="store_true",
                     help="after a run of the whole suite, write RELIABILITY.md from what the tests observed "
                          "(tests/reliability.py)")


def _asked(config) -> bool:
    return bool(config.getoption(WRITE_OPTION) or os.environ.get(OUT_ENV))


def pytest_configure(config):
    config.addinivalue_line("markers", "proves(*cases): the RELIABILITY.md cases this test proves (tests/reliability.py)")
    # Records are gathered only for a page that will be written; Recorder still checks every case id.
    if _is_controller(config) and _asked(config) and RECORDS_ENV not in os.environ:
        # Workers start after this and inherit the environment.
        os.environ[RECORDS_ENV] = tempfile.mkdtemp(prefix="flanops-reliability-")
        config._reliability_owner = True


def pytest_runtest_setup(item):
    marker = item.get_closest_marker("proves")
    folder = os.environ.get(RECORDS_ENV)
    if marker and folder:
        for case in marker.args:
            if case not in CASE_IDS:
                raise KeyError(f"{item.nodeid}: {case!r} is not a case in tests/reliability.py CASES")
            _append(Path(folder), {"case": case, "result": None, "figures": {}, "test": item.nodeid})


_OUTCOMES: dict[str, str] = {}   # nodeid → passed/failed/skipped, from every worker's reports


def pytest_runtest_logreport(report):
    if _OUTCOMES.get(report.nodeid) == "failed":
        return
    if report.failed:
        _OUTCOMES[report.nodeid] = "failed"
    elif report.skipped:
        _OUTCOMES[report.nodeid] = "skipped"
    elif report.when == "call":
        _OUTCOMES[report.nodeid] = "passed"


def _whole_suite(config) -> bool:
    """No test was chosen: the run's paths are the configured testpaths (the rootdir without them)."""
    option = config.option
    if (option.keyword or option.markexpr or option.collectonly or getattr(option, "deselect", None)
            or getattr(option, "lf", False) or getattr(option, "failedfirst", False)):
        return False
    root = Path(config.rootpath)
    suite = {(root / path).resolve() for path in config.getini("testpaths")} or {root.resolve()}
    # config.args: the paths pytest collected from (a node id such as a.py::t is no folder of the suite)
    return {Path(config.invocation_params.dir, arg).resolve() for arg in config.args} == suite


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if not (_is_controller(config) and getattr(config, "_reliability_owner", False)):
        return
    folder = Path(os.environ[RECORDS_ENV])
    records = [json.loads(line) for path in sorted(folder.glob("*.jsonl"))
               for line in path.read_text(encoding="utf-8").splitlines() if line]
    shutil.rmtree(folder, ignore_errors=True)
    out = os.environ.get(OUT_ENV)
    if not out and not _whole_suite(config):
        config._reliability_note = (f"RELIABILITY.md not written: {WRITE_OPTION} writes it only after a run of the "
                                    "whole suite (this run chose tests)")
        return
    target = Path(out) if out else Path(config.rootpath) / "RELIABILITY.md"
    text = render(records, dict(_OUTCOMES))
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(target)
    config._reliability_note = f"wrote {target}"


def pytest_terminal_summary(terminalreporter, config):
    note = getattr(config, "_reliability_note", None)
    if note:
        terminalreporter.write_line(note)


def _commit(root: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def render(records: list[dict], outcomes: dict[str, str]) -> str:
    by_case: dict[str, list[dict]] = {}
    for record in records:   # a claim (result None) stands only where its test recorded nothing
        if record["result"] is None and any(r["test"] == record["test"] and r["case"] == record["case"]
                                            and r["result"] is not None for r in records):
            continue
        by_case.setdefault(record["case"], []).append(record)
    root = Path(__file__).resolve().parent.parent
    lines = [
        "# Reliability and security",
        "",
        "Written by the test suite (`pytest --write-reliability`, as `.ci/run` runs it; see tests/reliability.py):",
        "each row is what a test observed, and the test's outcome. Do not edit by hand.",
        "",
        f"Last full run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {_commit(root)}, "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}.",
        "",
    ]
    counts = {"passed": 0, "failed": 0, "not run": 0}
    body: list[str] = []
    for section in SECTIONS:
        body += [f"## {section}", "", "| case | what happened | test | outcome |", "| --- | --- | --- | --- |"]
        group_now = None
        for case_id, case_section, group, description in CASES:
            if case_section != section:
                continue
            if group and group != group_now:
                body.append(f"| **{group}** | | | |")
                group_now = group
            seen = by_case.get(case_id, [])
            if not seen:
                counts["not run"] += 1
                body.append(f"| {_cell(description)} | — | — | **not run** |")
                continue
            case_outcomes = [outcomes.get(record["test"], "unknown") for record in seen]
            counts["passed" if set(case_outcomes) == {"passed"} else "failed"] += 1
            for record, outcome in zip(seen, case_outcomes):
                figures = ", ".join(f"{key} {value}" for key, value in record["figures"].items())
                result = (record["result"] + (f" ({figures})" if figures else "") if record["result"] is not None
                          else "no result: the test ended before recording one (see its output)")
                test = record["test"].split("@", 1)[0].split("::", 1)   # xdist appends "@group"
                body.append(f"| {_cell(description)} | {_cell(result)} | `{test[0].removeprefix('tests/')}::"
                            f"{_cell(test[-1])}` | {'passed' if outcome == 'passed' else '**' + outcome + '**'} |")
        body.append("")
    lines.append(f"{len(CASES)} cases: {counts['passed']} proven by passing tests, {counts['failed']} with a test "
                 f"that did not pass, {counts['not run']} not run.")
    lines.append("")
    return "\n".join(lines + body)
