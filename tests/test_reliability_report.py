"""RELIABILITY.md: how tests/reliability.py renders what tests record, when it writes the page, and that the
committed file is whole."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO
from reliability import CASES, OUT_ENV, RECORDS_ENV, render

pytestmark = pytest.mark.smoke   # the quick tier: pytest -m smoke


def test_every_case_appears_with_its_outcome_and_unrecorded_cases_say_not_run():
    records = [{"case": "data.empty", "result": "exit 2: empty | file", "figures": {"p99_ms": 12}, "test": "tests/a.py::t@g"},
               {"case": "fault.disk_full", "result": "exit 1", "figures": {}, "test": "tests/b.py::u"}]
    text = render(records, {"tests/a.py::t@g": "passed", "tests/b.py::u": "failed"})
    assert f"{len(CASES)} cases: 1 proven by passing tests, 1 with a test that did not pass, {len(CASES) - 2} not run" in text
    assert "| empty file | exit 2: empty \\| file (p99_ms 12) | `a.py::t` | passed |" in text
    assert "| disk full | exit 1 | `b.py::u` | **failed** |" in text
    assert "| truncated file | — | — | **not run** |" in text
    for _, section, _, description in CASES:
        assert f"| {description} |" in text.replace("\\|", "|")



def test_a_test_that_failed_before_recording_shows_against_the_cases_it_proves():
    claim = {"case": "load.over_limits", "result": None, "figures": {}, "test": "tests/l.py::t"}
    text = render([claim], {"tests/l.py::t": "failed"})
    assert ("| requests over the limits during the load | no result: the test ended before recording one "
            "(see its output) | `l.py::t` | **failed** |") in text
    recorded = {**claim, "result": "304 got their 4xx"}
    text = render([claim, recorded], {"tests/l.py::t": "passed"})
    assert "| 304 got their 4xx |" in text and "no result" not in text


def test_the_committed_reliability_md_is_from_a_full_run_that_proved_every_case():
    text = (REPO / "RELIABILITY.md").read_text(encoding="utf-8")
    summary = re.search(r"(\d+) cases: (\d+) proven by passing tests, (\d+) with a test that did not pass, (\d+) not run",
                        text)
    assert summary, "RELIABILITY.md has no summary line: run the whole suite (pytest) to write it"
    assert summary.groups() == (str(len(CASES)), str(len(CASES)), "0", "0"), \
        f"{summary.group(0)}: run the whole suite on a clean tree and commit the RELIABILITY.md it writes"
    for _, _, _, description in CASES:
        assert re.search(rf"^\| {re.escape(description)} \| [^—]", text, re.M), f"no result for '{description}'"


def _pytest_in(folder, *args: str) -> subprocess.CompletedProcess:
    """pytest with this plugin over one test that records a case, in ``folder`` (its rootdir)."""
    env = {k: v for k, v in os.environ.items() if k not in (RECORDS_ENV, OUT_ENV)}   # the outer run's, if any
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=120)


def test_reliability_md_is_written_only_when_asked_and_only_after_the_whole_suite(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\ntestpaths = suite\n")   # as pyproject.toml's tests
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(f"import sys\nsys.path.insert(0, {str(REPO / 'tests')!r})\n"
                                       "pytest_plugins = ('reliability',)\n")
    (suite / "test_one.py").write_text("def test_empty(reliability):\n"
                                          "    reliability.record('data.empty', 'exit 2: empty')\n\n"
                                          "def test_other():\n    pass\n")
    page = tmp_path / "RELIABILITY.md"
    plain = _pytest_in(tmp_path)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert not page.exists(), "a plain pytest run must not write RELIABILITY.md"
    for chosen in (["-k", "empty"], ["suite/test_one.py::test_empty"], ["--collect-only"]):
        partial = _pytest_in(tmp_path, "--write-reliability", *chosen)
        assert partial.returncode == 0 and not page.exists(), chosen
        assert "RELIABILITY.md not written" in partial.stdout, partial.stdout
    asked = _pytest_in(tmp_path, "--write-reliability")
    assert asked.returncode == 0 and f"wrote {page}" in asked.stdout, asked.stdout
    assert "| empty file | exit 2: empty | `suite/test_one.py::test_empty` | passed |" in page.read_text(encoding="utf-8")
