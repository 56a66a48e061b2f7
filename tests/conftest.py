"""Shared fixtures. Step scripts import ``stepkit`` as SageMaker would (their folder on sys.path)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STEPS = REPO / "steps"
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(STEPS))


def run_step(script: str, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``steps/<script>`` as its own process, the way SageMaker and a user run it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(
        [sys.executable, str(STEPS / script), *args], capture_output=True, text=True, env=full_env, timeout=600
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{script} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def dialogsum_dir() -> Path:
    """The real DialogSum splits, when ../shared is beside the clone (a user's clone has none)."""
    folder = SHARED_DATA / "dialogsum"
    if not (folder / "dialogsum.dev.jsonl").is_file():
        pytest.skip("../shared/data/dialogsum is not present (only on the project's own machines)")
    return folder
