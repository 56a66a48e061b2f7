"""Shared fixtures. Step scripts import as ``flanops.steps.<script>``, their kit as the installed ``stepkit``."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from moto import mock_aws  # imported before sagemaker (conftest loads first), so every client the SDK makes is mocked

REPO = Path(__file__).resolve().parent.parent
STEPS = REPO / "steps"
SHARED_DATA = REPO.parent / "shared" / "data"
pytest_plugins = ("reliability",)   # RELIABILITY.md, from the tests that prove each case


def pin_xdist_worker() -> None:
    """Give each xdist worker cores of its own; jobs it starts inherit them.

    Two torch trainings that each spread over both cores of a 2-core machine run many times
    slower together than one per core (measured: the chain fixture took over 600 s instead of
    about 250 s). Steps and the local executor size torch's threads to the cores they may use.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if count <= len(cores):
        share = cores[int(worker[2:]) % count::count]
        os.sched_setaffinity(0, share)
        os.environ["OMP_NUM_THREADS"] = str(len(share))   # torch in this process, before anything imports it


pin_xdist_worker()


# A user's AWS setup, which tests that run flanops on embedded AWS take out of its environment.
AWS_VARIABLES = ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL",
                 "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_CONFIG_FILE",
                 "AWS_SHARED_CREDENTIALS_FILE", "SAGEMAKER_USER_CONFIG_OVERRIDE")


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




@pytest.fixture(scope="session")
def chain(tmp_path_factory):
    """prepare → select tiny → LoRA fine-tune → evaluate, once per session (about 4 minutes on 2 cores).

    Later steps' tests (optimize, evaluate) start from its fine-tuned model. While iterating on
    those tests, ``FLANOPS_TEST_CHAIN=<a flanops run folder>`` reuses that run instead (its
    folders have the same names); CI never sets it.
    """
    reuse = os.environ.get("FLANOPS_TEST_CHAIN")
    if reuse:
        root = Path(reuse)
        return {"root": root, "data": root / "data", "model": root / "model", "tuned": root / "finetuned",
                "evaluation": root / "evaluation", "finetune_stdout": "", "evaluate_stdout": "",
                "result": json.loads((root / "evaluation" / "evaluation.json").read_text())}
    root = tmp_path_factory.mktemp("chain")
    data, model, tuned, evaluation = (root / name for name in ("data", "model", "finetuned", "evaluation"))
    run_step("prepare_data.py", "--input", "synthetic", "--output-dir", str(data), "--seed", "0",
             "--test-size", "100")
    run_step("select_model.py", "--model", "tiny", "--output-dir", str(model))
    from flanops.pipelines.config import load_config

    quick = load_config("quick")   # the quick run's fine-tune, flag for flag
    finetune = run_step("finetune_lora.py", "--model-dir", str(model), "--data-dir", str(data), "--output-dir", str(tuned),
                        "--lora-r", str(quick.parameters.LoraRank), "--lora-alpha", str(quick.parameters.LoraAlpha),
                        *quick.step_arguments("finetune"))
    evaluate = run_step("evaluate.py", "--model-dir", str(tuned), "--baseline-dir", str(model), "--data-dir", str(data),
                        "--output-dir", str(evaluation), "--constant-candidates", "50",
                        # timing is checked for presence and order here; benchmarks measure speed
                        "--speed-inputs", "4", "--speed-repeats", "2")
    return {"root": root, "data": data, "model": model, "tuned": tuned, "evaluation": evaluation,
            "finetune_stdout": finetune.stdout, "evaluate_stdout": evaluate.stdout,
            "result": json.loads((evaluation / "evaluation.json").read_text())}


@pytest.fixture
def fake_aws_credentials(monkeypatch):
    """moto's fake keys and a region, and no endpoint or profile of the developer's: for mock_aws tests."""
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)


# ----------------------------------------------------------------------------- one embedded AWS for two modules
# test_pipeline_local, then test_notebooks, share one FLANOPS_HOME (one embedded AWS server and one
# job cache): the notebooks' quick pipeline run then comes from the cache that the pipeline tests
# filled instead of training again (about 80 s less on the suite's longest worker).
EMBEDDED_GROUP = "embedded-aws"
EMBEDDED_MODULES = ("test_pipeline_local", "test_notebooks")    # in this order


def processes_under(root: Path) -> list[int]:
    """Pids (not ours) whose command line or working folder lies in ``root``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if str(root) in cmdline or cwd == str(root) or cwd.startswith(f"{root}/"):
            found.append(int(entry.name))
    return found


def kill_processes_under(root: Path) -> None:
    for pid in processes_under(root):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextlib.contextmanager
def own_flanops_home(home: Path):
    """The environment for flanops commands with a FLANOPS_HOME of their own and none of the user's
    AWS setup; afterwards its embedded AWS server is stopped and whatever still runs in it is killed."""
    env = {k: v for k, v in os.environ.items() if k not in AWS_VARIABLES}
    env.update(FLANOPS_HOME=str(home), PYTHONUNBUFFERED="1")
    try:
        yield env
    finally:
        subprocess.run([sys.executable, "-m", "flanops.pipelines.cli", "local", "stop"], env=env, capture_output=True,
                       timeout=60)
        kill_processes_under(home)


@contextlib.contextmanager
def mocked_aws(region: str, bucket: str):
    """In-process mocked AWS (moto) with ``bucket``, the environment set before the SDK is imported;
    yields a boto3 Session.

    The SDK's telemetry GET goes to an S3 URL, which mock_aws answers too (404), so nothing leaves
    the process. (A TelemetryOptOut config via SAGEMAKER_USER_CONFIG_OVERRIDE would also do, but
    the SDK validates that config with jsonschema on every session it makes: 4x slower builds.)
    """
    import shutil
    import tempfile

    import boto3

    home = tempfile.mkdtemp(prefix="flanops-home-")   # remembered definitions stay out of the user's ~/.flanops
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("FLANOPS_HOME", home)
        for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION",
                     "SAGEMAKER_USER_CONFIG_OVERRIDE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_DEFAULT_REGION", region)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("SAGEMAKER_VALIDATE_ROLE", "false")   # ModelTrainer would call IAM's policy simulator
        try:
            with mock_aws():
                session = boto3.Session(region_name=region)
                session.client("s3").create_bucket(Bucket=bucket)
                yield session
        finally:
            shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def embedded_root(tmp_path_factory):
    """The folder of the shared FLANOPS_HOME (``<root>/home``); at the end its server is stopped and
    whatever still runs in it (a server, executor or job a failed test left behind) is killed."""
    from flanops.pipelines.embedded import stop_server

    root = tmp_path_factory.mktemp("embedded")
    yield root
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("FLANOPS_HOME", str(root / "home"))
        stop_server()
    kill_processes_under(root)


@pytest.hookimpl(wrapper=True)   # a wrapper runs before every plain hook, so before xdist's reads the markers
def pytest_collection_modifyitems(config, items):
    """Keep each module on one xdist worker (its module fixtures are built once), every test that
    needs ``chain`` on the same worker (the session fixture is built once per worker), and the two
    embedded-AWS modules on one worker, the pipeline tests first."""
    for item in items:
        module = item.module.__name__
        group = "chain" if "chain" in item.fixturenames else EMBEDDED_GROUP if module in EMBEDDED_MODULES else module
        if group in ("chain", EMBEDDED_GROUP) and item.get_closest_marker("smoke"):
            # the smoke tier must stay under a minute: the chain trains for minutes, embedded AWS runs pipelines
            raise pytest.UsageError(f"{item.nodeid} is marked smoke but needs {group}, which takes minutes")
        item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda item: item.module.__name__ == EMBEDDED_MODULES[1])   # stable: notebooks last
    return (yield)
