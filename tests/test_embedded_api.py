"""The SageMaker API on embedded AWS tells what the local executor did (pipelines/embedded_api.py).

A notebook-style script that uses only the SageMaker SDK (``Pipeline.upsert``, ``start``, ``wait``,
``describe``, ``list_steps``) runs against embedded AWS in a process of its own, as a user's would;
its statuses and steps must be those that ``flanops executions`` / ``flanops steps`` print from
the executor's records. The runtime API forwards ``InvokeEndpoint`` to the endpoint served here.
"""
from __future__ import annotations

import http.server
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from conftest import own_flanops_home

PIPELINE = "sdk-check"

SDK_SCRIPT = textwrap.dedent('''
    import json, sys
    import boto3
    from sagemaker.core.helper.session_helper import Session
    from sagemaker.core.workflow.conditions import ConditionGreaterThanOrEqualTo
    from sagemaker.core.workflow.parameters import ParameterInteger
    from sagemaker.mlops.workflow.condition_step import ConditionStep
    from sagemaker.mlops.workflow.fail_step import FailStep
    from sagemaker.mlops.workflow.pipeline import Pipeline
    from botocore.exceptions import WaiterError

    session = Session(boto_session=boto3.Session())
    score = ParameterInteger(name="Score", default_value=5)
    too_low = FailStep(name="TooLow", error_message="the score is below 3")
    gate = ConditionStep(name="Gate", conditions=[ConditionGreaterThanOrEqualTo(left=score, right=3)],
                         if_steps=[], else_steps=[too_low])
    pipeline = Pipeline(name="sdk-check", parameters=[score], steps=[gate], sagemaker_session=session)
    pipeline.upsert(role_arn="arn:aws:iam::123456789012:role/sdk-check")
    seen = {}
    for value in (5, 1):
        execution = pipeline.start(parameters={"Score": value})
        try:
            execution.wait(delay=1, max_attempts=120)
            waited = "success"
        except WaiterError as err:
            waited = "failure" if "terminal failure state" in str(err) else f"timeout: {err}"
        described = execution.describe()
        seen[value] = {"arn": execution.arn, "waited": waited,
                       "status": described["PipelineExecutionStatus"], "reason": described.get("FailureReason"),
                       "steps": [[s["StepName"], s["StepStatus"], s.get("FailureReason"), s.get("Metadata")]
                                 for s in execution.list_steps()]}
    print(json.dumps(seen))
''')


# What a user's script starts with on embedded AWS: a bucket of its own and a PipelineSession on it.
SESSION = textwrap.dedent('''
    import boto3
    from sagemaker.core.workflow.pipeline_context import PipelineSession
    boto = boto3.Session()
    account = boto.client("sts").get_caller_identity()["Account"]
    bucket = f"{NAME}-{account}"
    boto.client("s3").create_bucket(Bucket=bucket)
    session = PipelineSession(boto_session=boto, default_bucket=bucket)
    role = f"arn:aws:iam::{account}:role/{NAME}"
''')

FUNCTION_SCRIPT = SESSION.replace("{NAME}", "sdk-function") + textwrap.dedent('''
    import json
    from sagemaker.mlops.workflow.function_step import step
    from sagemaker.mlops.workflow.pipeline import Pipeline


    @step(name="Add", role=role, instance_type="ml.m5.large",
          image_uri=f"{account}.dkr.ecr.{boto.region_name}.amazonaws.com/python:3")   # never pulled
    def add(a, b):
        return {"sum": a + b}

    pipeline = Pipeline(name="sdk-function", steps=[add(2, 3)], sagemaker_session=session)
    pipeline.upsert(role_arn=role)
    execution = pipeline.start()
    execution.wait(delay=1, max_attempts=300)
    print(json.dumps({"status": execution.describe()["PipelineExecutionStatus"], "result": execution.result("Add"),
                      "steps": [[s["StepName"], s["StepStatus"], sorted(s["Metadata"])] for s in execution.list_steps()]}))
''')


# Processing jobs with the SDK: a step that fails once (its marker file tells), one that sleeps when asked.
JOBS_SCRIPT = SESSION.replace("{NAME}", "sdk-jobs") + r'''import json, sys, time, warnings
from pathlib import Path

from sagemaker.core.processing import ScriptProcessor
from sagemaker.core.workflow.parameters import ParameterInteger
from sagemaker.mlops.workflow.pipeline import Pipeline
from sagemaker.mlops.workflow.selective_execution_config import SelectiveExecutionConfig
from sagemaker.mlops.workflow.steps import ProcessingStep

folder, marker = Path(sys.argv[1]), sys.argv[2]
image = f"{account}.dkr.ecr.{boto.region_name}.amazonaws.com/jobs:1"   # never pulled: jobs run as local processes

def job(name, body, arguments=()):
    script = folder / name.lower() / f"{name.lower()}.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text("import os, sys, time\n" + body, encoding="utf-8")
    processor = ScriptProcessor(image_uri=image, command=["python3"], role=role, instance_count=1,
                                instance_type="ml.m5.large", sagemaker_session=session)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ProcessingStep(name=name, step_args=processor.run(code=str(script), arguments=list(arguments)))

sleep = ParameterInteger(name="SleepSeconds", default_value=0)
first = job("Slow", "time.sleep(int(sys.argv[1]))\n", [sleep.to_string()])
flaky = job("Flaky", "m = sys.argv[1]\nif not os.path.exists(m):\n    open(m, 'w').close()\n    sys.exit('error: the first attempt fails')\n", [marker])
flaky.add_depends_on([first])
pipeline = Pipeline(name="sdk-jobs", parameters=[sleep], steps=[first, flaky], sagemaker_session=session)
pipeline.upsert(role_arn=role)
seen = {}

def outcome(execution):
    described = execution.describe()
    return {"arn": execution.arn, "status": described["PipelineExecutionStatus"], "reason": described.get("FailureReason"),
            "steps": {s["StepName"]: [s["StepStatus"], s.get("SelectiveExecutionResult"), s.get("AttemptCount")]
                      for s in execution.list_steps()}}

def settle(execution, limit=300):
    deadline = time.time() + limit
    while execution.describe()["PipelineExecutionStatus"] in ("Executing", "Stopping") and time.time() < deadline:
        time.sleep(0.5)

# 1. fails at Flaky; RetryPipelineExecution reruns it and the same execution succeeds
execution = pipeline.start()
settle(execution)
seen["failed"] = outcome(execution)
boto.client("sagemaker").retry_pipeline_execution(PipelineExecutionArn=execution.arn)
execution.wait(delay=1, max_attempts=300)
seen["retried"] = outcome(execution)
# 2. selective: only Flaky reruns, Slow's outputs come from the succeeded execution
again = pipeline.start(selective_execution_config=SelectiveExecutionConfig(
    source_pipeline_execution_arn=execution.arn, selected_steps=["Flaky"]))
again.wait(delay=1, max_attempts=300)
seen["selective"] = outcome(again)
# 3. stop while Slow sleeps
slow = pipeline.start(parameters={"SleepSeconds": 600})
deadline = time.time() + 120
while time.time() < deadline and not any(s["StepName"] == "Slow" and s["StepStatus"] == "Executing" for s in slow.list_steps()):
    time.sleep(0.5)
slow.stop()
seen["stopping"] = slow.describe()["PipelineExecutionStatus"]
settle(slow)
seen["stopped"] = outcome(slow)
print(json.dumps(seen))
'''


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """A FLANOPS_HOME of its own with embedded AWS running; yields the environment `flanops local env` exports."""
    root = tmp_path_factory.mktemp("embedded-api")
    with own_flanops_home(root / "home") as env:
        exported = subprocess.run([sys.executable, "-m", "flanops.pipelines.cli", "local", "env"], env=env,
                                  capture_output=True, text=True, timeout=120, check=True).stdout
        for line in exported.splitlines():
            if line.startswith("export "):
                name, _, value = line[len("export "):].partition("=")
                env[name] = shlex.split(value)[0] if value else ""
        env["SAGEMAKER_VALIDATE_ROLE"] = "false"
        yield root, env


def flanops(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flanops.pipelines.cli", *args, "--param",
                           f"pipeline_name={PIPELINE}"], env=env, capture_output=True, text=True, timeout=120)


def run_script(embedded, name: str, text: str, *args: str, timeout: float = 600) -> dict:
    """A user's script run against embedded AWS in a process of its own; the JSON its last line prints."""
    root, env = embedded
    script = root / f"{name}.py"
    script.write_text(text, encoding="utf-8")
    done = subprocess.run([sys.executable, str(script), *args], env=env, cwd=root, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def sdk_run(embedded):
    return {int(k): v for k, v in run_script(embedded, "sdk_check", SDK_SCRIPT).items()}


def test_the_sdk_waits_for_and_describes_what_ran(sdk_run):
    passed, failed = sdk_run[5], sdk_run[1]
    assert (passed["waited"], passed["status"], passed["reason"]) == ("success", "Succeeded", None)
    assert passed["steps"] == [["Gate", "Succeeded", None, {"Condition": {"Outcome": "True"}}]]
    assert (failed["waited"], failed["status"], failed["reason"]) == ("failure", "Failed", "the score is below 3")
    # the latest-started step first, as SageMaker lists them
    assert failed["steps"] == [["TooLow", "Failed", "the score is below 3", {"Fail": {"ErrorMessage": "the score is below 3"}}],
                               ["Gate", "Succeeded", None, {"Condition": {"Outcome": "False"}}]]


def test_flanops_prints_the_statuses_and_steps_the_api_gives(embedded, sdk_run):
    _, env = embedded
    listed = flanops(env, "executions")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split()[1] for line in listed.stdout.splitlines()[1:]}
    assert rows == {run["arn"].rsplit("/", 1)[-1]: run["status"] for run in sdk_run.values()}
    for run in sdk_run.values():
        steps = flanops(env, "steps", run["arn"].rsplit("/", 1)[-1])
        assert steps.returncode == 0, steps.stderr
        printed = [line.split()[:2] for line in steps.stdout.splitlines()[1:]]
        assert sorted(printed) == sorted([name, status] for name, status, _, _ in run["steps"])


def test_boto3_lists_executions_with_their_failure_and_refuses_what_cannot_be(embedded, sdk_run):
    _, env = embedded
    sagemaker = boto3.Session(region_name=env["AWS_DEFAULT_REGION"], aws_access_key_id="testing",
                              aws_secret_access_key="testing").client("sagemaker", endpoint_url=env["AWS_ENDPOINT_URL"])
    summaries = sagemaker.list_pipeline_executions(PipelineName=PIPELINE)["PipelineExecutionSummaries"]
    by_arn = {s["PipelineExecutionArn"]: s for s in summaries}
    assert by_arn[sdk_run[1]["arn"]]["PipelineExecutionStatus"] == "Failed"
    assert by_arn[sdk_run[1]["arn"]]["PipelineExecutionFailureReason"] == "the score is below 3"
    assert "PipelineExecutionFailureReason" not in by_arn[sdk_run[5]["arn"]]
    ascending = sagemaker.list_pipeline_execution_steps(PipelineExecutionArn=sdk_run[1]["arn"], SortOrder="Ascending")
    assert [s["StepName"] for s in ascending["PipelineExecutionSteps"]] == ["Gate", "TooLow"]
    with pytest.raises(ClientError, match="is Succeeded; only a Failed execution can be retried"):
        sagemaker.retry_pipeline_execution(PipelineExecutionArn=sdk_run[5]["arn"])
    with pytest.raises(ClientError, match="is Failed; only an Executing execution can be stopped"):
        sagemaker.stop_pipeline_execution(PipelineExecutionArn=sdk_run[1]["arn"])


def test_the_sdk_reads_a_function_steps_result(embedded):
    seen = run_script(embedded, "sdk_function", FUNCTION_SCRIPT)
    assert seen == {"status": "Succeeded", "result": {"sum": 5}, "steps": [["Add", "Succeeded", ["TrainingJob"]]]}


def test_retry_selective_execution_and_stop_through_the_sdk(embedded):
    """Processing jobs started with the SDK: a failed execution retried (RetryPipelineExecution) succeeds under
    the same ARN, a selective execution reruns one step and takes the other from its source, and a stopped
    execution says Stopping, then Stopped with its reason."""
    folder = embedded[0] / "sdk-jobs"
    seen = run_script(embedded, "sdk_jobs", JOBS_SCRIPT, str(folder), str(folder / "flaky-ran-once"), timeout=900)
    failed, retried, selective, stopped = seen["failed"], seen["retried"], seen["selective"], seen["stopped"]
    assert failed["status"] == "Failed" and "the first attempt fails" in failed["reason"]
    assert failed["steps"] == {"Slow": ["Succeeded", None, 1], "Flaky": ["Failed", None, 1]}
    assert (retried["arn"], retried["status"]) == (failed["arn"], "Succeeded")
    assert retried["steps"] == {"Slow": ["Succeeded", None, 1], "Flaky": ["Succeeded", None, 1]}
    assert selective["status"] == "Succeeded"
    assert selective["steps"] == {"Slow": ["Succeeded", {"SourcePipelineExecutionArn": failed["arn"]}, 1],
                                  "Flaky": ["Succeeded", None, 1]}
    assert seen["stopping"] in ("Stopping", "Stopped")   # Stopped once the executor has written it: a race
    assert (stopped["status"], stopped["reason"]) == ("Stopped", "stopped by StopPipelineExecution")
    assert stopped["steps"] == {"Slow": ["Stopped", None, 1]}


REFUSED_SCRIPT = textwrap.dedent('''
    import json, time
    import boto3
    from sagemaker.core.helper.session_helper import Session
    from sagemaker.mlops.workflow.callback_step import CallbackOutput, CallbackStep
    from sagemaker.mlops.workflow.pipeline import Pipeline

    boto = boto3.Session()
    queue = f"https://sqs.{boto.region_name}.amazonaws.com/123456789012/approvals"
    ask = CallbackStep(name="AskOutside", sqs_queue_url=queue, inputs={"model": "m"},
                       outputs=[CallbackOutput(output_name="answer")])
    pipeline = Pipeline(name="sdk-refused", steps=[ask], sagemaker_session=Session(boto_session=boto))
    pipeline.upsert(role_arn="arn:aws:iam::123456789012:role/sdk-refused")
    execution = pipeline.start()
    while execution.describe()["PipelineExecutionStatus"] == "Executing":
        time.sleep(0.2)
    described = execution.describe()
    print(json.dumps({"arn": execution.arn, "status": described["PipelineExecutionStatus"],
                      "reason": described.get("FailureReason"), "steps": execution.list_steps()}))
''')


def test_a_definition_the_executor_cannot_run_fails_through_the_api_with_its_one_line(embedded):
    _, env = embedded
    seen = run_script(embedded, "sdk_refused", REFUSED_SCRIPT)
    assert seen["status"] == "Failed" and seen["steps"] == []
    assert seen["reason"].startswith("step 'AskOutside': a Callback step waits for an outside system")
    assert "\n" not in seen["reason"]
    run_dir = Path(env["FLANOPS_HOME"]) / "runs" / "sdk-refused" / seen["arn"].rsplit("/", 1)[-1]
    assert sorted(p.name for p in run_dir.iterdir()) == ["refused.txt"]


@pytest.mark.skipif(shutil.which("aws") is None, reason="the AWS CLI is not installed (it is not a dependency)")
def test_the_aws_cli_lists_an_executions_steps(embedded, sdk_run):
    _, env = embedded
    done = subprocess.run(["aws", "sagemaker", "list-pipeline-execution-steps", "--pipeline-execution-arn",
                           sdk_run[1]["arn"]], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    steps = json.loads(done.stdout)["PipelineExecutionSteps"]
    assert [(s["StepName"], s["StepStatus"]) for s in steps] == [("TooLow", "Failed"), ("Gate", "Succeeded")]


# ----------------------------------------------------------------------------- the runtime API
class StubEndpoint(http.server.BaseHTTPRequestHandler):
    """Answers as the local endpoint server does: a summary, or a ModelError for a bad request."""

    def do_POST(self):   # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if json.loads(body).get("inputs") == "break":
            reply, status, error_type = json.dumps({"message": "bad input", "OriginalStatusCode": 400}), 424, "ModelError"
        else:
            reply, status, error_type = json.dumps([{"generated_text": f"{self.path} {self.headers['Accept']}"}]), 200, None
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if error_type:
            self.send_header("x-amzn-ErrorType", error_type)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply.encode())

    def log_message(self, *args):
        pass


def test_invoke_endpoint_on_embedded_aws_reaches_the_endpoint_served_here(embedded):
    root, env = embedded
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StubEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    announcement = Path(env["FLANOPS_HOME"]) / "endpoints" / f"stub@{os.getpid()}.json"
    announcement.parent.mkdir(parents=True, exist_ok=True)
    announcement.write_text(json.dumps({"endpoint_name": "stub", "url": f"http://127.0.0.1:{server.server_port}",
                                        "pid": os.getpid(), "region": "us-east-1"}), encoding="utf-8")
    runtime = boto3.Session(region_name=env["AWS_DEFAULT_REGION"], aws_access_key_id="testing",
                            aws_secret_access_key="testing").client("sagemaker-runtime",
                                                                    endpoint_url=env["AWS_ENDPOINT_URL"])
    try:
        reply = runtime.invoke_endpoint(EndpointName="stub", ContentType="application/json", Accept="application/json",
                                        Body=json.dumps({"inputs": "hello"}))
        assert json.loads(reply["Body"].read()) == [{"generated_text": "/endpoints/stub/invocations application/json"}]
        assert reply["ContentType"] == "application/json"
        with pytest.raises(runtime.exceptions.ModelError, match="bad input"):
            runtime.invoke_endpoint(EndpointName="stub", ContentType="application/json", Body=json.dumps({"inputs": "break"}))
        with pytest.raises(ClientError, match=r"Endpoint nowhere is not being served on this machine.*flanops serve.*stub"):
            runtime.invoke_endpoint(EndpointName="nowhere", ContentType="application/json", Body=b"{}")
    finally:
        server.shutdown()
        announcement.unlink(missing_ok=True)


@pytest.mark.smoke
def test_a_served_stage_that_is_redeployed_says_it_serves_the_earlier_package(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from flanops.infra.endpoint_client import endpoint_record
    from flanops.pipelines import endpoint_commands

    monkeypatch.setenv("FLANOPS_HOME", str(tmp_path))
    announcement = endpoint_record("ep", os.getpid())
    announcement.parent.mkdir(parents=True)
    announcement.write_text(json.dumps({"endpoint_name": "ep", "url": "http://127.0.0.1:1", "pid": os.getpid(),
                                        "region": "us-east-1", "model_package_arn": "arn:package/1"}), encoding="utf-8")
    deployments = iter(["arn:package/1", "arn:package/2"])
    monkeypatch.setattr(endpoint_commands, "deployed",
                        lambda session, stage, group: SimpleNamespace(model_package_arn=next(deployments, "arn:package/2")))
    stop = threading.Event()
    endpoint_commands.watch_stage(None, "group", "staging", "arn:package/1", "ep", stop, every_seconds=0.01)
    deadline = time.monotonic() + 30
    while "superseded_by" not in json.loads(announcement.read_text(encoding="utf-8")) and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    assert json.loads(announcement.read_text(encoding="utf-8"))["superseded_by"] == "arn:package/2"
    assert "stage staging was redeployed with arn:package/2; this server still serves arn:package/1" in \
        capsys.readouterr().out

    monkeypatch.setattr(endpoint_commands, "summarize_remotely", lambda client, name, texts, parameters: ["a summary"])
    assert endpoint_commands.invoke(SimpleNamespace(), "hello") == 0
    printed = capsys.readouterr()
    assert printed.out.strip() == "a summary"
    assert "serves arn:package/1, but its stage was redeployed with arn:package/2" in printed.err
