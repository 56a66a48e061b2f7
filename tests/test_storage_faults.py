"""A full disk and a read-only output folder: one clear error, no traceback, nothing half-written.

Real file systems, not mocks: each command runs in a private mount namespace (``unshare``, as
an unprivileged user may) where a 200 KB tmpfs stands for a full disk and a tmpfs remounted
read-only for a read-only folder. What the command left on them is listed before the
namespace goes away.
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import STEPS, own_flanops_home

LISTING = "--- left behind:"


def namespaces_available() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(not namespaces_available(),
                                reason="needs unshare and unprivileged user namespaces (Linux) to mount a small tmpfs")


def run_on_small_disks(tmp_path: Path, command: list[str], env: dict | None = None) -> tuple[int, str, list[str]]:
    """Run ``command`` with ``tmp_path/full`` a full 200 KB disk and ``tmp_path/ro`` read-only:
    (exit code, its output, what it left on those disks)."""
    full, read_only = tmp_path / "full", tmp_path / "ro"
    full.mkdir()
    read_only.mkdir()
    script = (f"mount -t tmpfs -o size=200k tmpfs {full} && mount -t tmpfs -o size=64k tmpfs {read_only} && "
              f"mkdir {read_only}/out && mount -o remount,ro {read_only} || exit 99\n"
              f"{shlex.join(command)}\ncode=$?\necho '{LISTING}'\n"
              f"(cd {tmp_path} && find full ro/out -mindepth 1)\nexit $code\n")
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", script],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
                            env=env)   # None: this process's environment
    assert result.returncode != 99, f"could not mount the test file systems: {result.stdout}"
    output, _, listing = result.stdout.partition(LISTING)
    return result.returncode, output, sorted(listing.split())


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.fixture
def flanops_env(tmp_path):
    """A FLANOPS_HOME of its own; its embedded AWS server is stopped afterwards."""
    with own_flanops_home(tmp_path / "home") as env:
        yield env


def test_a_step_writing_to_a_full_disk_says_so_and_publishes_nothing(tmp_path, reliability):
    code, output, left = run_on_small_disks(tmp_path, [sys.executable, str(STEPS / "prepare_data.py"),
                                                       "--output-dir", str(tmp_path / "full" / "data")])
    assert code == 2, output
    assert "Traceback" not in output, output
    [line] = error_lines(output)
    assert "no space left on the device" in line and "nothing was published" in line, line
    assert left == [], f"left on the full disk: {left}"
    reliability.record("fault.disk_full", f"prepare_data.py exit {code}: \"{line}\"; the disk holds nothing afterwards")


@pytest.mark.proves("fault.disk_full")
def test_a_run_on_a_full_disk_fails_its_step_clearly(tmp_path, flanops_env, reliability):
    code, output, left = run_on_small_disks(
        tmp_path, [sys.executable, "-m", "flanops.pipelines.cli", "run", "--no-deploy", "--output-dir", str(tmp_path / "full" / "run")],
        env=flanops_env)
    assert code != 0, output
    assert "Traceback" not in output, output[-3000:]
    failure = next(line for line in output.splitlines() if "Failed —" in line)
    assert "PrepareData: no space left on the device" in failure, failure
    assert not [path for path in left if path.endswith(".tmp")], f"half-written files: {left}"
    records = list((Path(flanops_env["FLANOPS_HOME"]) / "executions").rglob("*.json"))
    assert len(records) == 1, "the execution record (on another disk) is kept"
    reliability.record("fault.disk_full", f"flanops run exit {code}: \"{failure.strip()[:230]}\"; no half-written "
                                          "file left, the execution record kept")


@pytest.mark.proves("fault.read_only")
def test_a_read_only_output_folder_is_refused_before_anything_runs(tmp_path, flanops_env, reliability):
    target = tmp_path / "ro" / "out" / "run"
    code, output, left = run_on_small_disks(
        tmp_path, [sys.executable, "-m", "flanops.pipelines.cli", "run", "--output-dir", str(target)], env=flanops_env)
    assert code == 2 and "Traceback" not in output, output
    [line] = error_lines(output)
    assert f"--output-dir {target}" in line and "not writable" in line, line
    assert not (Path(flanops_env["FLANOPS_HOME"]) / "embedded").exists(), "nothing started: no embedded AWS"

    step_root = tmp_path / "step"
    step_root.mkdir()
    step_code, step_output, _ = run_on_small_disks(step_root, [
        sys.executable, str(STEPS / "prepare_data.py"), "--output-dir", str(step_root / "ro" / "out" / "data")])
    assert step_code == 2 and "Traceback" not in step_output, step_output
    [step_line] = error_lines(step_output)
    assert "Read-only file system" in step_line, step_line
    reliability.record("fault.read_only", f"flanops run exit {code} before starting anything: \"{line}\"; "
                                          f"prepare_data.py exit {step_code}: \"{step_line}\"")
