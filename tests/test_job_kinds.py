"""The local executor's other job kinds, on definitions the SageMaker SDK builds: a ModelStep that creates a
model, a TransformStep that runs S3 objects through the model's own code/inference.py, and ``@step``
functions run through the SDK's own remote-function invoker, their return values read back the way
the SDK reads them.

One embedded AWS server (moto) for the module, in a FLANOPS_HOME of its own: the jobs are child
processes, and the function steps' invoker talks to S3 itself, so the server has to be a real one.
A finaliser stops it and kills whatever still runs under the module's folder.
"""
from __future__ import annotations

import gzip
import json
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import AWS_VARIABLES, kill_processes_under
from flanops.pipelines.expressions import Context
from flanops.pipelines.local import LocalExecutor

BUCKET = "flanops-job-kinds"
ROLE = "arn:aws:iam::123456789012:role/flanops-job-kinds"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/inference:1"
INSTANCE = "ml.m5.large"

# A handler with the real one's interface and none of its weight: it answers JSON requests with the
# model's prefix before each input, "crash" kills its process as a segfault would, and "bug" raises.
ECHO_HANDLER = '''
import json, os

def model_fn(model_dir):
    return open(os.path.join(model_dir, "prefix.txt")).read()

def input_fn(data, content_type):
    if content_type != "application/json":
        raise ValueError(f"content type {content_type} is not supported")
    return json.loads(data)["inputs"]

def predict_fn(text, prefix):
    if text == "crash":
        os._exit(3)
    if text == "bug":
        raise KeyError("a bug in the handler")
    return prefix + text + os.environ.get("ECHO_SUFFIX", "")

def output_fn(prediction, accept):
    return json.dumps({"answer": prediction})
'''


@dataclass
class Aws:
    """The module's embedded AWS: a boto3 session on it and the environment its jobs get."""

    session: Any
    job_env: dict[str, str]
    root: Path

    def s3_text(self, uri: str) -> str:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return self.session.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read().decode()

    def put(self, key: str, body: bytes) -> str:
        self.session.client("s3").put_object(Bucket=BUCKET, Key=key, Body=body)
        return f"s3://{BUCKET}/{key}"

    def keys(self, prefix: str) -> list[str]:
        listed = self.session.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        return sorted(item["Key"] for item in listed.get("Contents", []))


@pytest.fixture(scope="module")
def aws(tmp_path_factory) -> Aws:
    from flanops.pipelines.embedded import ensure_server, stop_server

    root = tmp_path_factory.mktemp("job-kinds")
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name in AWS_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("FLANOPS_HOME", str(root / "home"))
        server = ensure_server()
        try:
            with server.activated():   # the SDK makes its own clients from the environment
                session = server.boto_session()
                session.client("s3").create_bucket(Bucket=BUCKET)
                yield Aws(session, server.environment(), root)
        finally:
            stop_server()
            kill_processes_under(root)


def pipeline_session(aws: Aws):
    from sagemaker.core.workflow.pipeline_context import PipelineSession

    return PipelineSession(boto_session=aws.session, default_bucket=BUCKET)


def definition(aws: Aws, name: str, steps: list, parameters: list | None = None) -> dict:
    """The pipeline's definition as the SDK writes it (what `flanops run` upserts and the executor reads)."""
    from sagemaker.mlops.workflow.pipeline import Pipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # "Popping out 'ModelName'…": SageMaker names it
        pipeline = Pipeline(name=name, steps=steps, parameters=parameters or [],
                            sagemaker_session=pipeline_session(aws))
        return json.loads(pipeline.definition())


def execute(aws: Aws, pipeline: str, document: dict, execution_id: str, parameters: dict | None = None,
            home: Path | None = None) -> tuple[dict, list[str]]:
    lines: list[str] = []
    executor = LocalExecutor(aws.session, pipeline, document, home or aws.root / "home",
                             aws.root / "runs" / execution_id, echo=lines.append, job_env=aws.job_env)
    arn = f"arn:aws:sagemaker:us-east-1:123456789012:pipeline/{pipeline}/execution/{execution_id}"
    return executor.start(parameters or {}, arn), lines


def steps_of(record: dict) -> dict[str, dict]:
    return {step["StepName"]: step for step in record["Steps"]}


def assert_recorded(step: dict, kind: str, status: str = "Succeeded") -> None:
    """A step's entry holds what ListPipelineExecutionSteps shows for it."""
    assert {"StepName", "StepType", "StepStatus", "StartTime", "EndTime", "Metadata", "CacheHitResult",
            "FailureReason"} <= set(step), step
    assert step["StepType"] == kind and step["StepStatus"] == status, step
    assert step["StartTime"] <= step["EndTime"], step


def pack(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
    return archive


@pytest.fixture(scope="module")
def echo_model(aws, tmp_path_factory) -> str:
    """A model.tar.gz with the echo handler in code/inference.py, in S3."""
    folder = tmp_path_factory.mktemp("echo-model")
    (folder / "code").mkdir()
    (folder / "code" / "inference.py").write_text(ECHO_HANDLER, encoding="utf-8")
    (folder / "prefix.txt").write_text("echo: ", encoding="utf-8")
    archive = pack(folder, folder.parent / "echo-model.tar.gz")
    return aws.put("models/echo/model.tar.gz", archive.read_bytes())


def create_model_step(aws: Aws, model_data: str, name: str = "CreateModel", environment: dict | None = None):
    """A ModelStep with a CreateModel request, as ModelBuilder.build() makes it under a PipelineSession."""
    from sagemaker.mlops.workflow.model_step import ModelStep
    from sagemaker.serve.model_builder import ModelBuilder

    builder = ModelBuilder(image_uri=IMAGE, s3_model_data_url=model_data, role_arn=ROLE, env_vars=environment or {},
                           sagemaker_session=pipeline_session(aws))
    return ModelStep(name=name, step_args=builder.build())


def transform_step(aws: Aws, model_name, data: str, output: str, name: str = "Transform", cache: bool = False,
                   split_type: str | None = "Line", assemble_with: str | None = "Line", compression: str | None = None):
    from sagemaker.core.transformer import Transformer
    from sagemaker.mlops.workflow.steps import CacheConfig, TransformStep

    # a job name base of its own: without one, the SDK describes a named model for its image, and moto's
    # DescribeModel answers VpcConfig {} for a model without one, which the SDK's Model resource refuses
    transformer = Transformer(model_name=model_name, instance_count=1, instance_type=INSTANCE, output_path=output,
                              accept="application/json", assemble_with=assemble_with, base_transform_job_name=name,
                              sagemaker_session=pipeline_session(aws))
    step_args = transformer.transform(data=data, content_type="application/json", split_type=split_type,
                                      compression_type=compression)
    return TransformStep(name=name, step_args=step_args,
                         cache_config=CacheConfig(enable_caching=True, expire_after="P1D") if cache else None)


def requests(*texts: str) -> bytes:
    return "".join(json.dumps({"inputs": text}) + "\n" for text in texts).encode()


# ----------------------------------------------------------------------------- CreateModel and Transform
def test_a_model_step_creates_the_model_and_a_transform_answers_every_line_through_its_handler(aws, echo_model):
    data = aws.put("t1/in/a.jsonl", requests("one", "two") + b"\n" + requests("three"))   # an empty line between
    aws.put("t1/in/sub/b.jsonl", requests("four"))
    model = create_model_step(aws, echo_model, environment={"ECHO_SUFFIX": "!"})
    document = definition(aws, "kinds-transform", [
        model, transform_step(aws, model.properties.ModelName, data.rsplit("/", 1)[0], f"s3://{BUCKET}/t1/out")])
    kinds = {step["Name"]: step for step in document["Steps"]}
    assert kinds["CreateModel"]["Type"] == "Model" and kinds["Transform"]["Type"] == "Transform"
    assert kinds["Transform"]["Arguments"]["ModelName"] == {"Get": "Steps.CreateModel.ModelName"}
    assert "ModelName" not in kinds["CreateModel"]["Arguments"]   # SageMaker names the model

    record, lines = execute(aws, "kinds-transform", document, "transform1")
    assert record["PipelineExecutionStatus"] == "Succeeded", (record["FailureReason"], lines)
    steps = steps_of(record)
    assert_recorded(steps["CreateModel"], "Model")
    assert_recorded(steps["Transform"], "Transform")
    assert steps["Transform"]["CacheHitResult"] is None and steps["Transform"]["FailureReason"] is None

    # the model is in (embedded) SageMaker, and the step's properties are its DescribeModel
    properties = record["Properties"]["CreateModel"]
    described = aws.session.client("sagemaker").describe_model(ModelName=properties["ModelName"])
    assert described["ModelArn"] == properties["ModelArn"] == steps["CreateModel"]["Metadata"]["Model"]["Arn"]
    assert described["PrimaryContainer"] == {"Image": IMAGE, "ModelDataUrl": echo_model,
                                             "Environment": {"ECHO_SUFFIX": "!"}}
    assert described["ExecutionRoleArn"] == ROLE

    # one request per line, answers assembled one a line, in <input>.out under S3OutputPath
    assert aws.keys("t1/out/") == ["t1/out/a.jsonl.out", "t1/out/sub/b.jsonl.out"]
    assert aws.s3_text(f"s3://{BUCKET}/t1/out/a.jsonl.out") == \
        '{"answer": "echo: one!"}\n{"answer": "echo: two!"}\n{"answer": "echo: three!"}\n'
    assert aws.s3_text(f"s3://{BUCKET}/t1/out/sub/b.jsonl.out") == '{"answer": "echo: four!"}\n'
    job = record["Properties"]["Transform"]
    assert job["ModelName"] == properties["ModelName"] and job["TransformJobStatus"] == "Completed"
    assert steps["Transform"]["Metadata"]["TransformJob"]["Arn"] == job["TransformJobArn"]
    assert job["TransformJobArn"].startswith("arn:aws:sagemaker:us-east-1:123456789012:transform-job/")
    # recorded in SageMaker once it ran, so DescribeTransformJob finds it as on SageMaker
    recorded = aws.session.client("sagemaker").describe_transform_job(TransformJobName=job["TransformJobName"])
    assert recorded["TransformJobArn"] == job["TransformJobArn"] and recorded["ModelName"] == properties["ModelName"]
    assert steps["Transform"]["Metadata"]["Pid"] > 0   # a process of its own
    log = (aws.root / "runs" / "transform1" / "jobs" / "Transform" / "job.log").read_text()
    assert "a.jsonl -> a.jsonl.out" in log and "sub/b.jsonl -> sub/b.jsonl.out" in log


def test_a_transform_of_an_existing_model_sends_whole_gzipped_objects_and_is_reused_from_the_cache(aws, echo_model,
                                                                                                   tmp_path):
    aws.session.client("sagemaker").create_model(ModelName="echo-existing", ExecutionRoleArn=ROLE,
                                                 PrimaryContainer={"Image": IMAGE, "ModelDataUrl": echo_model})
    data = aws.put("t2/in/whole.json.gz", gzip.compress(json.dumps({"inputs": "all of it"}).encode()))
    document = definition(aws, "kinds-whole", [transform_step(
        aws, "echo-existing", data, f"s3://{BUCKET}/t2/out", cache=True, split_type=None, assemble_with=None,
        compression="Gzip")])
    home = tmp_path / "home"
    first, lines = execute(aws, "kinds-whole", document, "whole1", home=home)
    assert first["PipelineExecutionStatus"] == "Succeeded", (first["FailureReason"], lines)
    assert aws.keys("t2/out/") == ["t2/out/whole.json.gz.out"]
    assert aws.s3_text(f"s3://{BUCKET}/t2/out/whole.json.gz.out") == '{"answer": "echo: all of it"}'   # no newline

    # the same arguments again: a cache hit; its outputs gone from S3 come back from the job's local copy
    aws.session.client("s3").delete_object(Bucket=BUCKET, Key="t2/out/whole.json.gz.out")
    second, lines = execute(aws, "kinds-whole", document, "whole2", home=home)
    reused = steps_of(second)["Transform"]
    assert_recorded(reused, "Transform")
    assert reused["CacheHitResult"] == {"SourcePipelineExecutionArn": first["PipelineExecutionArn"]}
    assert reused["Metadata"] == {"TransformJob": steps_of(first)["Transform"]["Metadata"]["TransformJob"]}
    assert any("restored 1 output(s) to S3" in line for line in lines), lines
    assert aws.s3_text(f"s3://{BUCKET}/t2/out/whole.json.gz.out") == '{"answer": "echo: all of it"}'


@pytest.mark.parametrize("execution, line, says", [
    ("crash", "crash", "Transform: the job failed (exit code 3); log: "),
    ("bug", "bug", "Transform: the job failed (exit code 1): error: in.jsonl record 2: the model answered 500: "
                   "the model handler failed: KeyError: 'a bug in the handler'; log: "),
], ids=["crash", "bug"])
def test_a_handler_that_fails_fails_the_step_with_its_log_and_the_executor_carries_on(aws, echo_model, execution,
                                                                                      line, says):
    data = aws.put(f"t3/{execution}/in.jsonl", requests("fine", line, "never sent"))
    model = create_model_step(aws, echo_model)
    output = f"s3://{BUCKET}/t3/{execution}/out"
    document = definition(aws, "kinds-broken", [model, transform_step(aws, model.properties.ModelName, data, output)])
    record, _ = execute(aws, "kinds-broken", document, execution)   # returns: the executor is not the one that died
    assert record["PipelineExecutionStatus"] == "Failed"
    failed = steps_of(record)["Transform"]
    assert_recorded(failed, "Transform", "Failed")
    log = aws.root / "runs" / execution / "jobs" / "Transform" / "job.log"
    assert failed["FailureReason"] == says + str(log)
    assert failed["Metadata"]["Pid"] > 0 and failed["Metadata"]["TransformJob"]["Arn"]
    assert aws.keys(f"t3/{execution}/out") == []   # the answer to "fine" is not published: the job failed
    if line == "bug":
        assert "KeyError: 'a bug in the handler'" in log.read_text()   # the handler's traceback



DIALOGUES = ["#Person1#: Can we meet on Tuesday at 2 pm?\n#Person2#: Yes, Ann, Tuesday at 2 pm works for me.",
             "#Person1#: How much is the blue jacket?\n#Person2#: It costs 40 dollars, Bob.",
             "#Person1#: Did you call the plumber?\n#Person2#: Not yet, I will call him tomorrow morning."]


def test_a_transform_through_a_flanops_model_package_answers_as_its_endpoint_answers(aws, tmp_path):
    """The real handler: the shipped stand-in model packaged as the pipeline registers models."""
    from stepkit.packaging import package_model
    from stepkit.tiny import STANDIN_DIR

    from flanops.infra.serving import LoadedModel, fetch_model_data

    archive = package_model(STANDIN_DIR, tmp_path / "model.tar.gz")
    model_data = aws.put("models/standin/model.tar.gz", archive.read_bytes())
    lines = [json.dumps({"inputs": dialogue, "parameters": {"max_new_tokens": 12}}) for dialogue in DIALOGUES]
    data = aws.put("t4/in/dialogues.jsonl", ("\n".join(lines) + "\n").encode())
    model = create_model_step(aws, model_data, environment={"FLANOPS_MAX_NEW_TOKENS": "12"})
    document = definition(aws, "kinds-standin", [
        model, transform_step(aws, model.properties.ModelName, data, f"s3://{BUCKET}/t4/out")])
    record, printed = execute(aws, "kinds-standin", document, "standin1")
    assert record["PipelineExecutionStatus"] == "Succeeded", (record["FailureReason"], printed[-20:])

    answers = aws.s3_text(f"s3://{BUCKET}/t4/out/dialogues.jsonl.out").splitlines()
    assert len(answers) == len(DIALOGUES)
    for answer in answers:
        (summary,) = json.loads(answer)
        assert isinstance(summary["generated_text"], str) and summary["generated_text"].strip()
    # the same artifact loaded as `flanops serve` loads it gives the same answer to each line
    served = LoadedModel(fetch_model_data(archive, None, tmp_path / "served"))
    assert answers == [served.invoke(line.encode(), "application/json", "application/json").body.decode()
                       for line in lines]


# ----------------------------------------------------------------------------- @step functions
def function_result(aws: Aws, record: dict, step_name: str):
    """What ``PipelineExecution.result(step_name)`` returns: the SDK's own reader, on the step list of the
    record (as ListPipelineExecutionSteps lists it) and (embedded) SageMaker and S3."""
    from sagemaker.core.helper.session_helper import Session
    from sagemaker.mlops.workflow.pipeline import get_function_step_result

    return get_function_step_result(step_name=step_name, step_list=record["Steps"],
                                    execution_id=record["ExecutionId"], sagemaker_session=Session(aws.session))


def function_pipeline(aws: Aws, tmp_path: Path) -> tuple[dict, Any]:
    """Add(a, b) with a parameter for b, Scale(Add's return) and a condition reading Add's return through
    JsonGet; the functions are local, so cloudpickle sends them by value, as a notebook's are."""
    from sagemaker.core.workflow.conditions import ConditionGreaterThan
    from sagemaker.core.workflow.parameters import ParameterInteger
    from sagemaker.mlops.workflow.condition_step import ConditionStep
    from sagemaker.mlops.workflow.fail_step import FailStep
    from sagemaker.mlops.workflow.function_step import step

    requirements = tmp_path / "requirements.txt"
    requirements.write_text("cloudpickle\npackaging>=20\n")   # installed here: checked, nothing installed

    @step(name="Add", instance_type=INSTANCE, role=ROLE, image_uri=IMAGE,
          pre_execution_commands=["python -m pip install --quiet cloudpickle"])
    def add(a: int, b: int) -> dict:
        return {"sum": a + b, "terms": [a, b]}

    @step(name="Scale", instance_type=INSTANCE, role=ROLE, image_uri=IMAGE, dependencies=str(requirements))
    def scale(total: int, factor: int) -> list:
        import os
        return [total * factor, os.path.basename(os.getcwd())]

    b = ParameterInteger(name="B", default_value=3)
    added = add(2, b)
    scaled = scale(added["sum"], 10)
    check = ConditionStep(name="Check", conditions=[ConditionGreaterThan(left=added["sum"], right=1)],
                          if_steps=[], else_steps=[FailStep(name="TooSmall", error_message="sum too small")])
    return definition(aws, "kinds-functions", [scaled, check], parameters=[b]), check


def test_step_functions_run_through_the_sdks_invoker_and_their_returns_read_back_as_the_sdk_reads_them(aws, tmp_path):
    document, _ = function_pipeline(aws, tmp_path)
    steps = {step["Name"]: step for step in document["Steps"]}
    assert steps["Add"]["Type"] == steps["Scale"]["Type"] == "Training"
    add_arguments = steps["Add"]["Arguments"]["AlgorithmSpecification"]["ContainerArguments"]
    assert add_arguments[-2:] == ["--serialize_output_to_json", "true"]   # Check reads its return through JsonGet
    # the JsonGet reads an S3 object (another branch adds S3Uri to expressions.py); run the function steps only
    runnable = {**document, "Steps": [step for step in document["Steps"] if step["Name"] != "Check"]}

    record, lines = execute(aws, "kinds-functions", runnable, "functions1", {"B": 4})
    assert record["PipelineExecutionStatus"] == "Succeeded", (record["FailureReason"], lines[-30:])
    listed = steps_of(record)
    for name in ("Add", "Scale"):
        assert_recorded(listed[name], "Training")
        assert listed[name]["Metadata"]["TrainingJob"]["Arn"].startswith(
            "arn:aws:sagemaker:us-east-1:123456789012:training-job/kinds-functions-")
        assert listed[name]["Metadata"]["Pid"] > 0

    # the SDK's own reader: DescribeTrainingJob (embedded SageMaker) → OutputDataConfig.S3OutputPath → S3
    assert function_result(aws, record, "Add") == {"sum": 6, "terms": [2, 4]}
    assert function_result(aws, record, "Scale") == [60, "sagemaker_remote_function_workspace"]
    results = record["Properties"]["Add"]["OutputDataConfig"]["S3OutputPath"]
    build_time = add_arguments[add_arguments.index("--func_step_s3_dir") + 1]
    assert results == f"s3://{BUCKET}/kinds-functions/Add/{build_time}/functions1/results"

    # where the definition's JsonGet on Add's return reads: {"Result": …} at Join([S3OutputPath, "results.json"])
    json_get = steps["Check"]["Arguments"]["Conditions"][0]["LeftValue"]["Std:JsonGet"]
    ctx = Context(record["ExecutionId"], record["PipelineExecutionArn"], "kinds-functions", record["Parameters"],
                  record["Properties"], record["PropertyFiles"])
    uri = ctx.resolve(json_get["S3Uri"])
    assert uri == f"{results}/results.json" and json_get["Path"] == "Result['sum']"
    assert json.loads(aws.s3_text(uri)) == {"Result": {"sum": 6, "terms": [2, 4]}, "Exception": None}
    assert any("Invoking the function" in line for line in lines)


def test_a_function_that_raises_fails_its_step_with_the_exception_where_the_sdk_keeps_it(aws):
    from sagemaker.core.helper.session_helper import Session
    from sagemaker.core.remote_function.core.serialization import deserialize_exception_from_s3
    from sagemaker.mlops.workflow.function_step import step

    @step(name="Divide", instance_type=INSTANCE, role=ROLE, image_uri=IMAGE)
    def divide(a: int, b: int) -> float:
        return a / b

    record, lines = execute(aws, "kinds-failing", definition(aws, "kinds-failing", [divide(1, 0)]), "failing1")
    assert record["PipelineExecutionStatus"] == "Failed"
    failed = steps_of(record)["Divide"]
    assert_recorded(failed, "Training", "Failed")
    log = aws.root / "runs" / "failing1" / "jobs" / "Divide" / "job.log"
    assert failed["FailureReason"] == f"Divide: the function raised ZeroDivisionError('division by zero'); log: {log}"
    assert record["FailureReason"] == failed["FailureReason"]
    assert "ZeroDivisionError: division by zero" in log.read_text()   # the traceback, in the job's log
    # the invoker serialized the exception where the SDK's RemoteExecutor looks: <base>/<execution>/<step>/exception
    error = deserialize_exception_from_s3(Session(aws.session),
                                          f"s3://{BUCKET}/kinds-failing/failing1/Divide/exception")
    assert isinstance(error, ZeroDivisionError)
    assert not [key for key in aws.keys("kinds-failing/Divide/") if "/failing1/" in key]   # no results


@pytest.mark.parametrize("execution, command, says", [
    ("missing", "pip install flanops-no-such-package==9.9",
     "needs flanops-no-such-package==9.9, which this Python does not have; the container would pip-install them, "
     "the local executor does not change your environment: pip install flanops-no-such-package==9.9"),
    ("too-new", "pip3 install -q 'packaging<1'", "needs packaging<1 (installed: "),
    ("not-pip", "apt-get install -y graphviz", "the pre-execution command 'apt-get install -y graphviz' would run "
     "on this machine, not in a container; the local executor runs only pip installs of what this Python already has"),
], ids=["missing", "too-new", "not-pip"])
def test_setup_a_container_would_install_is_refused_in_one_line_unless_already_here(aws, execution, command, says):
    from sagemaker.mlops.workflow.function_step import step

    @step(name="Setup", instance_type=INSTANCE, role=ROLE, image_uri=IMAGE, pre_execution_commands=[command])
    def setup() -> int:
        return 1

    record, _ = execute(aws, "kinds-setup", definition(aws, "kinds-setup", [setup()]), execution)
    failed = steps_of(record)["Setup"]
    assert_recorded(failed, "Training", "Failed")
    assert failed["FailureReason"].startswith("Setup: ") and says in failed["FailureReason"], failed["FailureReason"]
    assert "\n" not in failed["FailureReason"] and "Pid" not in failed["Metadata"]   # refused before anything ran


def test_a_cached_function_step_reuses_the_earlier_return_and_the_sdk_still_reads_it(aws, tmp_path):
    from sagemaker.mlops.workflow.function_step import step

    @step(name="Stamp", instance_type=INSTANCE, role=ROLE, image_uri=IMAGE)
    def stamp() -> str:
        import uuid
        return uuid.uuid4().hex   # a new value on every run: a reused one proves the cache

    document = definition(aws, "kinds-cached", [stamp()])
    # the SDK's @step takes no cache_config; SageMaker's schema allows CacheConfig on any Training step
    document["Steps"][0]["CacheConfig"] = {"Enabled": True, "ExpireAfter": "P1D"}
    home = tmp_path / "home"
    first, _ = execute(aws, "kinds-cached", document, "cached1", home=home)
    assert first["PipelineExecutionStatus"] == "Succeeded", first["FailureReason"]
    value = function_result(aws, first, "Stamp")
    second, lines = execute(aws, "kinds-cached", document, "cached2", home=home)
    reused = steps_of(second)["Stamp"]
    assert_recorded(reused, "Training")
    assert reused["CacheHitResult"] == {"SourcePipelineExecutionArn": first["PipelineExecutionArn"]}
    # the reused job, as SageMaker lists a cached step (and where get_function_step_result looks); no process ran
    assert reused["Metadata"] == {"TrainingJob": steps_of(first)["Stamp"]["Metadata"]["TrainingJob"]}
    assert function_result(aws, second, "Stamp") == value

    # its results gone from S3 (embedded AWS restarted): restored from the job's local copy on the next hit
    results = first["Properties"]["Stamp"]["OutputDataConfig"]["S3OutputPath"]
    s3 = aws.session.client("s3")
    for key in aws.keys(results.removeprefix(f"s3://{BUCKET}/")):
        s3.delete_object(Bucket=BUCKET, Key=key)
    third, lines = execute(aws, "kinds-cached", document, "cached3", home=home)
    assert steps_of(third)["Stamp"]["CacheHitResult"] is not None
    assert any("restored 1 output(s) to S3" in line for line in lines), lines
    assert function_result(aws, third, "Stamp") == value


def test_the_function_step_contract_is_the_installed_sdks(monkeypatch):
    """functionstep.py names the SDK's paths without importing the SDK into the executor: they must agree."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")   # the SDK makes a boto3 client as it is imported
    from sagemaker.core.remote_function import job
    from sagemaker.core.remote_function.core import stored_function

    from flanops.pipelines import functionstep

    assert functionstep.ENTRYPOINT == job.JOBS_CONTAINER_ENTRYPOINT
    assert functionstep.WORKSPACE == job.JOB_REMOTE_FUNCTION_WORKSPACE
    assert functionstep.SETUP_CHANNEL == job.SCRIPT_AND_DEPENDENCIES_CHANNEL_NAME
    assert functionstep.PRE_EXECUTION_SCRIPT == job.PRE_EXECUTION_SCRIPT_NAME
    assert stored_function.RESULTS_FOLDER == "results" and stored_function.JSON_RESULTS_FILE == "results.json"
    assert "python -m sagemaker.core.remote_function.invoke_function" in job.ENTRYPOINT_SCRIPT
