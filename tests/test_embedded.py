"""The embedded AWS server: started once, shared by processes, replaced when stale, stopped cleanly.

Every test uses its own FLANOPS_HOME under tmp_path, and a finaliser kills any server whose
command line names that home, so no moto process outlives the tests, even after a failure.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from flanops.pipelines import embedded
from flanops.pipelines.embedded import EmbeddedAws, ensure_server, server_status, state_file, stop_server

# Variables from the developer's shell that would change what the code under test sees.
_AWS_VARIABLES = ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN")


def _server_pids_under(home: Path) -> list[int]:
    """Pids of launcher processes whose command line names ``home`` (their --ready-file lives there)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "flanops.pipelines.embedded_server serve" in cmdline and str(home) in cmdline:
            pids.append(int(entry.name))
    return pids


def _kill_leftovers(home: Path) -> None:
    for pid in _server_pids_under(home):
        try:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _use_home(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    monkeypatch.setenv("FLANOPS_HOME", str(home))
    for name in _AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh FLANOPS_HOME with no server yet; whatever the test starts is stopped afterwards."""
    home = tmp_path / "flanops-home"
    _use_home(monkeypatch, home)
    try:
        yield home
    finally:
        stop_server()
        _kill_leftovers(home)


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedAws, Path]]:
    """One server for the tests that only use it (starting one costs about a second)."""
    home = tmp_path_factory.mktemp("flanops-shared-home")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _use_home(monkeypatch, home)
        try:
            yield ensure_server(), home
        finally:
            stop_server()
            _kill_leftovers(home)


@pytest.fixture
def aws(shared_server: tuple[EmbeddedAws, Path], monkeypatch: pytest.MonkeyPatch) -> EmbeddedAws:
    _use_home(monkeypatch, shared_server[1])
    return shared_server[0]


def _client(aws: EmbeddedAws, service: str):
    """A client built only from environment(), the way a child process sees the server."""
    env = aws.environment()
    return boto3.client(
        service,
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )


def _run_python(code: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env or dict(os.environ)
    )
    assert result.returncode == 0, (
        f"child exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result.stdout


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_start_writes_state_and_serves_s3(aws: EmbeddedAws, shared_server: tuple[EmbeddedAws, Path]) -> None:
    state = json.loads(state_file().read_text())
    assert state_file() == shared_server[1] / "embedded" / "server.json"
    assert state["pid"] == aws.pid and state["port"] == aws.port
    assert state["endpoint_url"] == aws.endpoint_url == f"http://127.0.0.1:{aws.port}"
    assert state["region"] == aws.region == embedded.EMBEDDED_REGION
    assert Path(state["log"]).is_file() and state["started_at"]
    assert server_status() == aws

    s3 = _client(aws, "s3")
    s3.create_bucket(Bucket="flanops-embedded-test")
    body = os.urandom(3 * 1024 * 1024)  # binary, several MB: a model artifact, not a toy string
    s3.put_object(Bucket="flanops-embedded-test", Key="models/model.tar.gz", Body=body)
    assert s3.get_object(Bucket="flanops-embedded-test", Key="models/model.tar.gz")["Body"].read() == body


def test_second_process_reuses_the_server(aws: EmbeddedAws) -> None:
    _client(aws, "s3").create_bucket(Bucket="flanops-seen-by-child")
    code = (
        "import json, boto3\n"
        "from flanops.pipelines.embedded import ensure_server\n"
        "aws = ensure_server()\n"
        "with aws.activated():\n"
        "    names = [b['Name'] for b in boto3.client('s3').list_buckets()['Buckets']]\n"
        "print(json.dumps({'pid': aws.pid, 'endpoint_url': aws.endpoint_url, 'buckets': names}))\n"
    )
    child = json.loads(_run_python(code).splitlines()[-1])
    assert child["pid"] == aws.pid and child["endpoint_url"] == aws.endpoint_url
    assert "flanops-seen-by-child" in child["buckets"]
    assert ensure_server() == aws


def test_sagemaker_model_package_groups(aws: EmbeddedAws) -> None:
    sagemaker = aws.boto_session().client("sagemaker")
    assert sagemaker.meta.endpoint_url == aws.endpoint_url
    sagemaker.create_model_package_group(ModelPackageGroupName="flan-t5-embedded-test")
    groups = sagemaker.list_model_package_groups()["ModelPackageGroupSummaryList"]
    assert "flan-t5-embedded-test" in [g["ModelPackageGroupName"] for g in groups]


def test_environment_does_not_leak_the_users_aws_setup(aws: EmbeddedAws, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_PROFILE", "real-user")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "real-token")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3.example.invalid")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAREALUSERKEY")

    env = aws.environment()
    assert env["AWS_ACCESS_KEY_ID"] == "testing" and env["AWS_SECRET_ACCESS_KEY"] == "testing"
    assert env["SAGEMAKER_VALIDATE_ROLE"] == "false"
    assert {"AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"} <= set(aws.variables_to_unset())
    child_env = aws.subprocess_environment()
    assert not {"AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"} & set(child_env)
    assert child_env["AWS_ACCESS_KEY_ID"] == "testing" and child_env["FLANOPS_HOME"] == os.environ["FLANOPS_HOME"]

    with aws.activated():
        assert "AWS_PROFILE" not in os.environ and "AWS_ENDPOINT_URL_S3" not in os.environ
        assert os.environ["AWS_ENDPOINT_URL"] == aws.endpoint_url
        session = boto3.Session()  # the default chain now resolves to the server and the fake keys
        assert session.get_credentials().access_key == "testing"
        assert session.client("s3").meta.endpoint_url == aws.endpoint_url
    assert os.environ["AWS_PROFILE"] == "real-user" and os.environ["AWS_ACCESS_KEY_ID"] == "AKIAREALUSERKEY"
    assert os.environ["AWS_ENDPOINT_URL_S3"] == "https://s3.example.invalid"
    assert "AWS_ENDPOINT_URL" not in os.environ

    # boto_session() ignores the profile (which does not exist) without touching os.environ.
    session = aws.boto_session()
    assert session.get_credentials().access_key == "testing"
    session.client("s3").list_buckets()


def test_user_region_overrides_the_default(aws: EmbeddedAws, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    reused = ensure_server()
    assert reused.pid == aws.pid and reused.region == "eu-west-1"
    assert reused.environment()["AWS_REGION"] == "eu-west-1"


def test_stale_state_file_is_replaced(home: Path) -> None:
    state_file().parent.mkdir(parents=True)
    dead = _dead_pid()
    stale = {"pid": dead, "port": 9, "endpoint_url": "http://127.0.0.1:9", "region": "us-east-1"}
    state_file().write_text(json.dumps(stale))
    assert server_status() is None

    aws = ensure_server()
    assert aws.pid != dead and aws.port != 9
    assert json.loads(state_file().read_text())["pid"] == aws.pid
    _client(aws, "s3").list_buckets()


def test_a_server_an_earlier_flanops_started_is_still_recognised() -> None:
    """Before the flanops.pipelines layout the server ran as ``-m flanops.embedded``: after an upgrade,
    stop_server must still stop it (and ensure_server reuse it) instead of orphaning it."""
    def pretending(module: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m", module, "serve", "--host"])

    earlier, unrelated = pretending("flanops.embedded"), pretending("flanops.somethingelse")
    try:
        assert embedded._is_server_process(earlier.pid)
        assert not embedded._is_server_process(unrelated.pid)
    finally:
        for process in (earlier, unrelated):
            process.kill()
            process.wait()


def test_stop_server(home: Path) -> None:
    aws = ensure_server()
    _client(aws, "s3").create_bucket(Bucket="flanops-lost-on-stop")
    assert stop_server() is True
    assert not state_file().exists()
    assert server_status() is None
    with pytest.raises(ProcessLookupError):
        os.kill(aws.pid, 0)  # stop_server reaped it: not even a zombie is left
    assert stop_server() is False

    # State lives only as long as the server (module docstring): a new server starts empty.
    restarted = ensure_server()
    assert restarted.pid != aws.pid
    assert _client(restarted, "s3").list_buckets()["Buckets"] == []


def test_concurrent_callers_start_one_server(home: Path) -> None:
    code = "from flanops.pipelines.embedded import ensure_server; print(ensure_server().pid)"
    children = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [child.communicate(timeout=60) for child in children]
    assert all(child.returncode == 0 for child in children), outputs
    pids = {int(stdout.strip()) for stdout, _ in outputs}
    assert len(pids) == 1
    assert _server_pids_under(home) == list(pids)


def test_server_survives_the_process_that_started_it(home: Path) -> None:
    started = int(_run_python("from flanops.pipelines.embedded import ensure_server; print(ensure_server().pid)").strip())
    status = server_status()
    assert status is not None and status.pid == started


def test_import_starts_nothing(home: Path) -> None:
    _run_python("import flanops.pipelines.embedded")
    assert not state_file().exists() and _server_pids_under(home) == []


def test_flanops_local_env_points_a_shell_at_the_server(aws: EmbeddedAws) -> None:
    """``eval "$(flanops local env)"``: the shell's boto3 (and AWS CLI) reach this server, even with a profile set."""
    _client(aws, "s3").create_bucket(Bucket="flanops-seen-by-shell")
    script = ('eval "$("$PYTHON" -m flanops.pipelines.cli local env)" && '
              '"$PYTHON" -c "import boto3; print(boto3.client(\'s3\').list_buckets()[\'Buckets\'])"')
    env = {**os.environ, "PYTHON": sys.executable, "AWS_PROFILE": "someone-elses"}
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert "flanops-seen-by-shell" in result.stdout
    assert server_status() == aws   # the running server, not a second one
