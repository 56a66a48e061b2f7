"""Static security checks on the code as committed: bandit on the Python (settings and skips in
pyproject.toml's [tool.bandit]); cfn-lint and the IaC linter run on the generated templates in
test_security.py."""
from __future__ import annotations

import json
import re
import subprocess
import sys

from conftest import REPO

SCANNED = ["pipelines", "steps", "infra", "benchmarks"]
NOSEC = re.compile(r"#\s*nosec\b(?P<rest>.*)$")


def test_bandit_finds_nothing_and_every_exception_says_why(tmp_path, reliability):
    report = tmp_path / "bandit.json"
    result = subprocess.run([sys.executable, "-m", "bandit", "-c", "pyproject.toml", "-r", *SCANNED, "-f", "json",
                             "-o", str(report)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert report.is_file(), result.stderr[-2000:]
    findings = json.loads(report.read_text(encoding="utf-8"))
    problems = [f"{r['filename']}:{r['line_number']} {r['test_id']} {r['issue_text']}" for r in findings["results"]]
    assert not problems, problems
    assert not findings["errors"], findings["errors"]
    assert result.returncode == 0, result.stderr[-2000:]

    # A line-level exception names its check and gives a reason: "# nosec B615 # a local folder".
    marks = []
    for path in (path for folder in SCANNED for path in sorted((REPO / folder).rglob("*.py"))):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            match = NOSEC.search(line)
            if match:
                marks.append(f"{path.relative_to(REPO)}:{number}")
                assert re.match(r"\s+B\d{3}(\s*,\s*B\d{3})*\s+#\s*\S", match["rest"]), \
                    f"{path.relative_to(REPO)}:{number}: '# nosec' needs a check id and a reason: {line.strip()}"
    totals = findings["metrics"]["_totals"]
    version = subprocess.run([sys.executable, "-m", "bandit", "--version"], capture_output=True, text=True
                             ).stdout.split()[1]
    reliability.record("security.python_lint",
                       f"bandit {version} on {', '.join(SCANNED)}: {int(totals['loc'])} lines, 0 findings; skipped "
                       f"B404/B603 (subprocess with argument lists, never a shell) and B311 (random for synthetic "
                       f"data); {len(marks)} line-level exceptions, each with its reason (local folders for B615, "
                       "tokenizer special tokens for B105/B106, moto's dummy keys)")
