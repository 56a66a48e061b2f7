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
import time
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
        pipeline = Pipeline(name=name, steps=steps, parameters=parameters or [], sagemaker_session=pipeline_session(aws))
        return json.loads(pipeline.definition())


def execute(aws: Aws, pipeline: str, document: dict, execution_id: str, parameters: dict | None = None,
            home: Path | None = None) -> tuple[dict, list[str]]:
    lines: list[str] = []
    executor = LocalExecutor(aws.session, pipeline, document, home or aws.root / "home", aws.root / "runs" / execution_id,
                             echo=lines.append, job_env=aws.job_env)
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

    transformer = Transformer(model_name=model_name, instance_count=1, instance_type=INSTANCE, output_path=output,
                              accept="application/json", assemble_with=assemble_with,
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
    assert described["PrimaryContainer"]["ModelDataUrl"] == echo_model and described["PrimaryContainer"]["Image"] == IMAGE
    assert described["PrimaryContainer"]["Environment"] == {"ECHO_SUFFIX": "!"}
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
    assert steps["Transform"]["Metadata"]["Pid"] > 0   # a process of its own
    log = (aws.root / "runs" / "transform1" / "jobs" / "Transform" / "job.log").read_text()
    assert "a.jsonl -> a.jsonl.out" in log and "sub/b.jsonl -> sub/b.jsonl.out" in log
