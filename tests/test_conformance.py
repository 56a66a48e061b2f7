"""Conformance of the local executor: definitions built with the SageMaker SDK v3 itself, each run against moto.

Each test builds a pipeline with the SDK's own classes (Pipeline, ProcessingStep over a ScriptProcessor,
TrainingStep over a ModelTrainer, ConditionStep, FailStep, ModelStep, parameters, execution variables,
Join, JsonGet, StepDependency, retry policies, caching) and asserts what SageMaker would make of it:
which steps run, their properties, outcomes and record entries (PipelineExecutionStep's shape). The
constructs the executor does not run are refused before anything starts, one test per step type.

Every job is a few lines of Python run as the container contract says (well under a second each), in
moto's in-process AWS (conftest.mocked_aws); the stop tests run an executor in a subprocess of its own
and signal it. Times are asserted from the execution records, never from wall-clock speed.
"""
from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import mocked_aws
from flanops.pipelines.failures import DefinitionRefused
from flanops.pipelines.local import REFUSAL_FILE, LocalExecutor
from flanops.pipelines.records import records_dir
from flanops.pipelines.retries import MAX_INTERVAL_ENV, retry_wait
from flanops.pipelines.scheduler import INTERRUPTED, STOPPED_BY_API

REGION = "us-east-1"
ACCOUNT = "123456789012"   # moto's
BUCKET = "flanops-conformance"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/flanops-conformance"
IMAGE = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/conformance:1"   # never pulled: jobs run as local processes
OUT = "/opt/ml/processing/output/out"
# What every processing job's script starts with: its output folder is its first argument (the executor maps
# container paths in arguments to the job's sandbox), the rest are ARGS.
PREAMBLE = """\
import json, os, signal, sys, time
OUT, ARGS = sys.argv[1], sys.argv[2:]
os.makedirs(OUT, exist_ok=True)
def write(name, value):
    with open(os.path.join(OUT, name), "w") as f:
        json.dump(value, f)
"""


# ----------------------------------------------------------------------------- building with the SDK
@dataclass
class Sdk:
    """The SDK's pipeline building, against moto, and the local executor to run what it builds."""

    session: Any
    pipeline_session: Any
    folder: Path
    pipeline: str = "conformance"

    def parameters(self, **defaults) -> dict:
        from sagemaker.core.workflow.parameters import (ParameterBoolean, ParameterFloat, ParameterInteger,
                                                         ParameterString)

        kinds = {bool: ParameterBoolean, int: ParameterInteger, float: ParameterFloat, str: ParameterString}
        return {name: kinds[type(value)](name=name, default_value=value) for name, value in defaults.items()}

    def output(self, step: str, output: str = "out"):
        from sagemaker.core.shapes import ProcessingOutput, ProcessingS3Output
        from sagemaker.core.workflow.execution_variables import ExecutionVariables
        from sagemaker.core.workflow.functions import Join

        uri = Join(on="/", values=[f"s3://{BUCKET}", ExecutionVariables.PIPELINE_NAME,
                                   ExecutionVariables.PIPELINE_EXECUTION_ID, step, output])
        return ProcessingOutput(output_name=output, s3_output=ProcessingS3Output(
            s3_uri=uri, local_path=f"/opt/ml/processing/output/{output}", s3_upload_mode="EndOfJob"))

    def input(self, name: str, uri):
        from sagemaker.core.shapes import ProcessingInput, ProcessingS3Input

        return ProcessingInput(input_name=name, s3_input=ProcessingS3Input(
            s3_uri=uri, local_path=f"/opt/ml/processing/input/{name}", s3_data_type="S3Prefix", s3_input_mode="File"))

    def job(self, name: str, body: str, arguments: list | tuple = (), inputs: list | tuple = (), **step):
        """A ProcessingStep whose job runs PREAMBLE + ``body`` (ScriptProcessor) and publishes its ``out`` folder."""
        from sagemaker.core.processing import ScriptProcessor
        from sagemaker.mlops.workflow.steps import ProcessingStep

        script = self.folder / uuid.uuid4().hex[:8] / f"{name.lower()}.py"
        script.parent.mkdir(parents=True)
        script.write_text(PREAMBLE + textwrap.dedent(body), encoding="utf-8")
        processor = ScriptProcessor(image_uri=IMAGE, command=["python3"], role=ROLE, instance_count=1,
                                    instance_type="ml.m5.large", sagemaker_session=self.pipeline_session)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # "Running within a PipelineSession…": we only compile
            arguments = processor.run(code=str(script), inputs=list(inputs), outputs=[self.output(name)],
                                      arguments=[OUT, *arguments])
        return ProcessingStep(name=name, step_args=arguments, **step)

    def trainer_step(self, name: str, body: str, hyperparameters: dict, inputs: dict | None = None, **step):
        """A TrainingStep over a ModelTrainer with source code: ``body`` runs with its hyperparameters as flags."""
        from sagemaker.core.shapes import OutputDataConfig
        from sagemaker.core.workflow.execution_variables import ExecutionVariables
        from sagemaker.core.workflow.functions import Join
        from sagemaker.mlops.workflow.steps import TrainingStep
        from sagemaker.train import ModelTrainer
        from sagemaker.train.configs import Compute, InputData, SourceCode

        source = self.folder / uuid.uuid4().hex[:8]
        source.mkdir()
        (source / "train.py").write_text(textwrap.dedent(body), encoding="utf-8")
        trainer = ModelTrainer(
            training_image=IMAGE, role=ROLE, sagemaker_session=self.pipeline_session, base_job_name=name,
            source_code=SourceCode(source_dir=str(source), entry_script="train.py"),
            compute=Compute(instance_type="ml.m5.large", instance_count=1), hyperparameters=hyperparameters,
            output_data_config=OutputDataConfig(s3_output_path=Join(on="/", values=[
                f"s3://{BUCKET}", ExecutionVariables.PIPELINE_NAME, ExecutionVariables.PIPELINE_EXECUTION_ID, name])))
        channels = [InputData(channel_name=channel, data_source=uri) for channel, uri in (inputs or {}).items()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return TrainingStep(name=name, step_args=trainer.train(input_data_config=channels or None), **step)

    def definition(self, steps: list, parameters: dict | None = None) -> dict:
        from sagemaker.mlops.workflow.pipeline import Pipeline

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # "Running within a PipelineSession…": we only compile
            pipeline = Pipeline(name=self.pipeline, parameters=list((parameters or {}).values()), steps=steps,
                                sagemaker_session=self.pipeline_session)
            return json.loads(pipeline.definition())

    def arn(self, execution: str) -> str:
        return f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:pipeline/{self.pipeline}/execution/{execution}"

    def run(self, root: Path, definition: dict, execution: str = "e1", values: dict | None = None,
            **start) -> "Run":
        lines: list[str] = []
        run_dir = root / f"run-{execution}"
        executor = LocalExecutor(self.session, self.pipeline, definition, root / "home", run_dir, echo=lines.append)
        record = executor.start(values or {}, self.arn(execution), **start)
        return Run(record, lines, run_dir, definition)

    def refusal(self, root: Path, definition: dict, execution: str = "refused", **start) -> str:
        """Start an execution that must be refused; its one-line message, once the refusal left only itself."""
        with pytest.raises(DefinitionRefused) as refused:
            self.run(root, definition, execution, **start)
        message = str(refused.value)
        assert "\n" not in message and message.endswith("Nothing was started."), message
        run_dir = root / f"run-{execution}"
        assert sorted(p.name for p in run_dir.iterdir()) == [REFUSAL_FILE], "the run folder holds only the refusal"
        assert (run_dir / REFUSAL_FILE).read_text(encoding="utf-8") == message + "\n"
        record = json.loads((records_dir(root / "home", self.pipeline) / f"{execution}.json").read_text())
        assert record["PipelineExecutionStatus"] == "Failed" and record["Steps"] == [], record
        assert record["FailureReason"] == message and record["Resumable"] is False
        return message


@dataclass
class Run:
    record: dict
    lines: list[str]
    run_dir: Path
    definition: dict
    steps: dict[str, dict] = field(init=False)

    def __post_init__(self):
        self.steps = {entry["StepName"]: entry for entry in self.record["Steps"]}

    def output(self, step: str, name: str) -> Any:
        """A file the step's job wrote to its ``out`` folder (its sandbox copy)."""
        path = self.run_dir / "jobs" / step / OUT.lstrip("/") / name
        return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def aws():
    with mocked_aws(REGION, BUCKET) as session:
        # the SDK's modules load once here (seconds), not inside the first test that builds with them
        import sagemaker.core.processing  # noqa: F401
        import sagemaker.mlops.workflow.condition_step  # noqa: F401
        import sagemaker.mlops.workflow.pipeline  # noqa: F401
        import sagemaker.train  # noqa: F401

        yield session


@pytest.fixture
def sdk(aws, tmp_path, request) -> Sdk:
    """The SDK against moto, with a pipeline name of the test's own."""
    from sagemaker.core.workflow.pipeline_context import PipelineSession

    from flanops.pipelines.definition import SDK_CONFIG, quiet_sdk, validate_sdk_config_once

    quiet_sdk()
    validate_sdk_config_once()
    name = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name.removeprefix("test_"))[:40].strip("-")
    session = PipelineSession(boto_session=aws, default_bucket=BUCKET, sagemaker_config=SDK_CONFIG)
    return Sdk(aws, session, tmp_path / "sdk", pipeline=f"cf-{name}")


def s3_json(session, uri: str) -> Any:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return json.loads(session.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read())


def ran_a_job(entry: dict) -> bool:
    return "Pid" in entry["Metadata"]


# ----------------------------------------------------------------------------- conditions
@pytest.mark.smoke
def test_every_condition_type_decides_as_sagemaker_does(sdk, tmp_path):
    from sagemaker.core.workflow.conditions import (ConditionEquals, ConditionGreaterThan,
                                                     ConditionGreaterThanOrEqualTo, ConditionIn, ConditionLessThan,
                                                     ConditionLessThanOrEqualTo, ConditionNot, ConditionOr)
    from sagemaker.mlops.workflow.condition_step import ConditionStep

    p = sdk.parameters(Count=3, Score=0.75, Stage="prod", Enabled=True)
    count, score, stage, enabled = p["Count"], p["Score"], p["Stage"], p["Enabled"]
    conditions = {
        "EqualsInteger": [ConditionEquals(left=count, right=3)],
        "EqualsString": [ConditionEquals(left=stage, right="dev")],
        "EqualsBoolean": [ConditionEquals(left=enabled, right=True)],
        "GreaterThan": [ConditionGreaterThan(left=score, right=0.75)],
        "GreaterThanOrEqualTo": [ConditionGreaterThanOrEqualTo(left=score, right=0.75)],
        "LessThan": [ConditionLessThan(left=count, right=10)],
        "LessThanOrEqualTo": [ConditionLessThanOrEqualTo(left=count, right=2)],
        "In": [ConditionIn(value=stage, in_values=["dev", "prod"])],
        "InParameters": [ConditionIn(value=3, in_values=[count, 7])],
        "Not": [ConditionNot(expression=ConditionEquals(left=stage, right="prod"))],
        "NotNot": [ConditionNot(expression=ConditionNot(expression=ConditionLessThan(left=count, right=10)))],
        "Or": [ConditionOr(conditions=[ConditionEquals(left=count, right=0), ConditionLessThan(left=score, right=1.0)])],
        "OrNone": [ConditionOr(conditions=[ConditionEquals(left=count, right=0), ConditionNot(
            expression=ConditionIn(value=stage, in_values=["prod"]))])],
        "AllOfTwo": [ConditionEquals(left=count, right=3), ConditionGreaterThan(left=score, right=0.9)],
    }
    steps = [ConditionStep(name=name, conditions=items, if_steps=[], else_steps=[]) for name, items in conditions.items()]
    definition = sdk.definition(steps, p)
    not_condition = next(s for s in definition["Steps"] if s["Name"] == "Not")["Arguments"]["Conditions"][0]
    assert set(not_condition) == {"Type", "Condition"}, "the SDK writes ConditionNot's operand as 'Condition'"

    defaults = sdk.run(tmp_path, definition, "defaults")
    assert defaults.record["PipelineExecutionStatus"] == "Succeeded", defaults.record["FailureReason"]
    outcomes = {name: entry["Metadata"]["Condition"]["Outcome"] for name, entry in defaults.steps.items()}
    assert outcomes == {"EqualsInteger": "True", "EqualsString": "False", "EqualsBoolean": "True",
                        "GreaterThan": "False", "GreaterThanOrEqualTo": "True", "LessThan": "True",
                        "LessThanOrEqualTo": "False", "In": "True", "InParameters": "True", "Not": "False",
                        "NotNot": "True", "Or": "True", "OrNone": "False", "AllOfTwo": "False"}
    # the same definition with other parameter values, as StartPipelineExecution's PipelineParameters give them
    other = sdk.run(tmp_path, definition, "other", values={"Count": 0, "Score": 0.95, "Stage": "dev"})
    outcomes = {name: entry["Metadata"]["Condition"]["Outcome"] for name, entry in other.steps.items()}
    assert outcomes == {"EqualsInteger": "False", "EqualsString": "True", "EqualsBoolean": "True",
                        "GreaterThan": "True", "GreaterThanOrEqualTo": "True", "LessThan": "True",
                        "LessThanOrEqualTo": "True", "In": "True", "InParameters": "False", "Not": "True",
                        "NotNot": "True", "Or": "True", "OrNone": "True", "AllOfTwo": "False"}
    assert other.record["Parameters"] == {"Count": 0, "Score": 0.95, "Stage": "dev", "Enabled": True}


def test_condition_steps_nest_to_any_depth(sdk, tmp_path):
    """Outer (true) → IfSteps: Middle (false) → ElseSteps: Inner (true) → IfSteps: the Deep job. Jobs on every
    branch not taken must not run, and SageMaker does not list them."""
    from sagemaker.core.workflow.conditions import ConditionEquals, ConditionNot
    from sagemaker.mlops.workflow.condition_step import ConditionStep
    from sagemaker.mlops.workflow.fail_step import FailStep

    p = sdk.parameters(Depth=3)
    deep = sdk.job("Deep", "write('deep.json', {'reached': True})")
    inner = ConditionStep(name="Inner", conditions=[ConditionNot(expression=ConditionEquals(left=p["Depth"], right=0))],
                          if_steps=[deep], else_steps=[sdk.job("InnerElse", "")])
    middle = ConditionStep(name="Middle", conditions=[ConditionEquals(left=p["Depth"], right=2)],
                           if_steps=[FailStep(name="MiddleIf", error_message="wrong branch")], else_steps=[inner])
    outer = ConditionStep(name="Outer", conditions=[ConditionEquals(left=p["Depth"], right=3)],
                          if_steps=[middle], else_steps=[sdk.job("OuterElse", "")])
    run = sdk.run(tmp_path, sdk.definition([outer], p))
    assert run.record["PipelineExecutionStatus"] == "Succeeded", run.record["FailureReason"]
    assert list(run.steps) == ["Outer", "Middle", "Inner", "Deep"]
    assert [run.steps[n]["Metadata"]["Condition"]["Outcome"] for n in ("Outer", "Middle", "Inner")] == \
        ["True", "False", "True"]
    assert ran_a_job(run.steps["Deep"]) and run.output("Deep", "deep.json") == {"reached": True}
    assert sorted(p.name for p in (run.run_dir / "jobs").iterdir()) == ["Deep"]


# ----------------------------------------------------------------------------- expressions
def test_every_execution_variable_resolves_as_sagemaker_does(sdk, tmp_path):
    """All eight ExecutionVariables; StartDateTime is the execution's start (its record's CreationTime), the same
    for a step that reads it seconds later, while CurrentDateTime is the time of reading."""
    from sagemaker.core.workflow.execution_variables import ExecutionVariables as V

    everyone = [V.START_DATETIME, V.CURRENT_DATETIME, V.PIPELINE_NAME, V.PIPELINE_ARN, V.PIPELINE_EXECUTION_ID,
                V.PIPELINE_EXECUTION_ARN]
    first = sdk.job("First", "write('seen.json', ARGS); time.sleep(1.2)", arguments=[*everyone, V.PROCESSING_JOB_NAME])
    later = sdk.job("Later", "write('seen.json', ARGS)", arguments=[V.START_DATETIME, V.CURRENT_DATETIME],
                    depends_on=[first])
    train = sdk.trainer_step("Train", """\
        import argparse, os
        parser = argparse.ArgumentParser()
        parser.add_argument("--job")
        job = parser.parse_args().job
        print(f"training job name: {job}")
        open(os.path.join(os.environ["SM_MODEL_DIR"], "job.txt"), "w").write(job)
        """, hyperparameters={"job": V.TRAINING_JOB_NAME}, depends_on=[later])
    run = sdk.run(tmp_path, sdk.definition([first, later, train]))
    assert run.record["PipelineExecutionStatus"] == "Succeeded", run.record["FailureReason"]
    start, current, name, pipeline_arn, execution_id, execution_arn, job_name = run.output("First", "seen.json")
    assert start == run.record["CreationTime"] and current >= start
    assert (name, execution_id, execution_arn) == (sdk.pipeline, "e1", sdk.arn("e1"))
    assert pipeline_arn == f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:pipeline/{sdk.pipeline}"
    assert job_name == run.record["Properties"]["First"]["ProcessingJobName"]
    later_start, later_current = run.output("Later", "seen.json")
    assert later_start == start, "StartDateTime is the execution's start, not the time a step reads it"
    assert later_current > start   # First took more than a second
    training_job = run.record["Properties"]["Train"]["TrainingJobName"]
    assert f"training job name: {training_job}" in "\n".join(run.lines)
    assert training_job.startswith(f"{sdk.pipeline}-Train")


def test_join_and_jsonget_read_property_files_and_s3_objects(sdk, tmp_path):
    """JsonGet from a PropertyFile and from an S3 URI (what @step functions and newer property files use), with
    JsonPath keys in brackets; Join of parameters, execution variables and JsonGet."""
    from sagemaker.core.workflow.conditions import ConditionEquals, ConditionGreaterThanOrEqualTo
    from sagemaker.core.workflow.execution_variables import ExecutionVariables
    from sagemaker.core.workflow.functions import Join, JsonGet
    from sagemaker.core.workflow.properties import PropertyFile
    from sagemaker.mlops.workflow.condition_step import ConditionStep

    p = sdk.parameters(Stage="beta")
    report = PropertyFile(name="Report", output_name="out", path="report.json")
    measure = sdk.job("Measure", "write('report.json', {'metrics': {'score': 0.9}, 'names': ['a', 'b'], "
                                 "'odd key': {'x': 7}})", property_files=[report])
    from_file = JsonGet(step_name="Measure", property_file=report, json_path="metrics.score")
    from_s3 = JsonGet(s3_uri=Join(on="/", values=[measure.properties.ProcessingOutputConfig.Outputs["out"].S3Output.S3Uri,
                                                 "report.json"]), json_path="names[1]")
    bracketed = JsonGet(step_name="Measure", property_file=report, json_path="['odd key'].x")
    use = sdk.job("Use", "write('args.json', ARGS)", arguments=[
        Join(on=":", values=[p["Stage"], ExecutionVariables.PIPELINE_EXECUTION_ID, from_file]), from_s3, bracketed])
    gate = ConditionStep(name="Gate", conditions=[ConditionGreaterThanOrEqualTo(left=from_file, right=0.8),
                                                  ConditionEquals(left=from_s3, right="b"),
                                                  ConditionEquals(left=bracketed, right=7)],
                         if_steps=[use], else_steps=[])
    definition = sdk.definition([measure, gate], p)
    s3_get = next(s for s in definition["Steps"] if s["Name"] == "Gate")["Arguments"]["Conditions"][1]["LeftValue"]
    assert set(s3_get["Std:JsonGet"]) == {"S3Uri", "Path"}, "the SDK's JsonGet with an s3_uri"
    run = sdk.run(tmp_path, definition)
    assert run.record["PipelineExecutionStatus"] == "Succeeded", run.record["FailureReason"]
    assert run.steps["Gate"]["Metadata"]["Condition"] == {"Outcome": "True"}
    assert run.output("Use", "args.json") == ["beta:e1:0.9", "b", "7"]
    assert run.record["PropertyFiles"]["Measure.Report"]["metrics"] == {"score": 0.9}


def test_jsonget_of_a_missing_s3_object_fails_the_step_in_one_line(sdk, tmp_path):
    from sagemaker.core.workflow.conditions import ConditionEquals
    from sagemaker.core.workflow.functions import Join, JsonGet
    from sagemaker.mlops.workflow.condition_step import ConditionStep

    measure = sdk.job("Measure", "")
    missing = JsonGet(s3_uri=Join(on="/", values=[measure.properties.ProcessingOutputConfig.Outputs["out"].S3Output.S3Uri,
                                                 "absent.json"]), json_path="x")
    gate = ConditionStep(name="Gate", conditions=[ConditionEquals(left=missing, right=1)], if_steps=[], else_steps=[])
    run = sdk.run(tmp_path, sdk.definition([measure, gate]))
    assert run.record["PipelineExecutionStatus"] == "Failed"
    reason = run.steps["Gate"]["FailureReason"]
    assert "absent.json" in reason and "NoSuchKey" in reason and "\n" not in reason, reason


def test_step_properties_of_each_job_kind(sdk, tmp_path):
    """Processing → Training → RegisterModel, and a job reading the properties of each, as the API describes them."""
    from sagemaker.mlops.workflow.model_step import ModelStep
    from sagemaker.serve.model_builder import ModelBuilder

    prepare = sdk.job("Prepare", "open(os.path.join(OUT, 'data.txt'), 'w').write('hello')")
    data_uri = prepare.properties.ProcessingOutputConfig.Outputs["out"].S3Output.S3Uri
    train = sdk.trainer_step("Train", """\
        import os, shutil
        data = open(os.path.join(os.environ["SM_CHANNEL_DATA"], "data.txt")).read()
        open(os.path.join(os.environ["SM_MODEL_DIR"], "model.txt"), "w").write(data.upper())
        """, hyperparameters={}, inputs={"data": data_uri})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        builder = ModelBuilder(image_uri=IMAGE, s3_model_data_url=train.properties.ModelArtifacts.S3ModelArtifacts,
                               role_arn=ROLE, sagemaker_session=sdk.pipeline_session)
        register = ModelStep(name="Register", step_args=builder.register(
            model_package_group_name=f"{sdk.pipeline}-models", approval_status="PendingManualApproval",
            content_types=["text/plain"], response_types=["text/plain"], inference_instances=["ml.m5.large"],
            transform_instances=["ml.m5.large"]))
    read = sdk.job("Read", "write('properties.json', ARGS)", arguments=[
        prepare.properties.ProcessingJobName, data_uri, prepare.properties.ProcessingJobStatus,
        train.properties.TrainingJobName, train.properties.ModelArtifacts.S3ModelArtifacts,
        train.properties.TrainingJobStatus, register.properties.ModelPackageArn])
    definition = sdk.definition([prepare, train, register, read])
    assert [(s["Name"], s["Type"]) for s in definition["Steps"]] == [
        ("Prepare", "Processing"), ("Train", "Training"), ("Register", "RegisterModel"), ("Read", "Processing")]
    run = sdk.run(tmp_path, definition)
    assert run.record["PipelineExecutionStatus"] == "Succeeded", run.record["FailureReason"]
    properties = run.record["Properties"]
    package_arn = run.steps["Register"]["Metadata"]["RegisterModel"]["Arn"]
    assert run.output("Read", "properties.json") == [
        properties["Prepare"]["ProcessingJobName"], f"s3://{BUCKET}/{sdk.pipeline}/e1/Prepare/out", "Completed",
        properties["Train"]["TrainingJobName"], properties["Train"]["ModelArtifacts"]["S3ModelArtifacts"],
        "Completed", package_arn]
    assert run.steps["Prepare"]["Metadata"]["ProcessingJob"]["Arn"] == properties["Prepare"]["ProcessingJobArn"]
    assert run.steps["Train"]["Metadata"]["TrainingJob"]["Arn"] == properties["Train"]["TrainingJobArn"]
    package = sdk.session.client("sagemaker").describe_model_package(ModelPackageName=package_arn)
    artifact = package["InferenceSpecification"]["Containers"][0]["ModelDataUrl"]
    assert artifact == properties["Train"]["ModelArtifacts"]["S3ModelArtifacts"]
    bucket, _, key = artifact.removeprefix("s3://").partition("/")
    local = tmp_path / "model.tar.gz"
    sdk.session.client("s3").download_file(bucket, key, str(local))
    with tarfile.open(local) as tar:
        assert tar.extractfile("model.txt").read() == b"HELLO"


# ----------------------------------------------------------------------------- run conditions, retries
def test_run_conditions_on_dependencies(sdk, tmp_path):
    """StepDependency triggers: a step that runs when its upstream fails, one on any outcome, one only on success;
    an execution whose failure a run condition handled ends CompletedWithFailures, as on SageMaker."""
    from sagemaker.mlops.workflow.step_dependency import StepDependency, TriggerCondition

    p = sdk.parameters(ExitCode=1)
    flaky = sdk.job("Flaky", "print('error: flaky exits', ARGS[0]); sys.exit(int(ARGS[0]))", arguments=[p["ExitCode"]])
    on_failure = sdk.job("OnFailure", "", depends_on=[StepDependency(flaky, TriggerCondition.FAILED)])
    on_success = sdk.job("OnSuccess", "", depends_on=[flaky])
    always = sdk.job("Always", "", depends_on=[StepDependency(flaky, TriggerCondition.ANY)])
    after_handler = sdk.job("AfterHandler", "", depends_on=[on_failure])
    definition = sdk.definition([flaky, on_failure, on_success, always, after_handler], p)
    depends = {s["Name"]: s.get("DependsOn") for s in definition["Steps"]}
    assert depends["OnFailure"] == [{"Step": "Flaky", "Trigger": "Failed"}] and depends["OnSuccess"] == ["Flaky"]
    assert depends["Always"] == [{"Step": "Flaky", "Trigger": "Any"}]

    failed = sdk.run(tmp_path, definition, "fails")
    assert failed.record["PipelineExecutionStatus"] == "CompletedWithFailures", failed.record["FailureReason"]
    assert {n: e["StepStatus"] for n, e in failed.steps.items()} == {
        "Flaky": "Failed", "OnFailure": "Succeeded", "Always": "Succeeded", "AfterHandler": "Succeeded"}
    assert "exit code 1" in failed.steps["Flaky"]["FailureReason"] and "Flaky" in failed.record["FailureReason"]

    succeeded = sdk.run(tmp_path, definition, "succeeds", values={"ExitCode": 0})
    assert succeeded.record["PipelineExecutionStatus"] == "Succeeded", succeeded.record["FailureReason"]
    assert sorted(succeeded.steps) == ["Always", "Flaky", "OnSuccess"]


def test_an_unhandled_failure_ends_the_execution_and_nothing_new_starts(sdk, tmp_path):
    flaky = sdk.job("Flaky", "print('error: no good'); sys.exit(3)")
    independent = sdk.job("Independent", "")
    run = sdk.run(tmp_path, sdk.definition([flaky, independent]))
    assert run.record["PipelineExecutionStatus"] == "Failed" and run.record["Resumable"] is True
    assert list(run.steps) == ["Flaky"], "one step at a time: the failure came first and nothing started after it"
    assert run.record["FailureReason"] == run.steps["Flaky"]["FailureReason"]
    assert "exit code 3" in run.record["FailureReason"] and "error: no good" in run.record["FailureReason"]


KILLED_ONCE = """\
marker = ARGS[0]
if not os.path.exists(marker):
    open(marker, "w").write("attempted")
    os.kill(os.getpid(), signal.SIGKILL)   # as the OOM killer would: SageMaker.JOB_INTERNAL_ERROR
write("done.json", True)
"""


def test_retry_policies_retry_a_killed_job_with_capped_backoff(sdk, tmp_path, monkeypatch):
    from sagemaker.mlops.workflow.retry import (SageMakerJobExceptionTypeEnum, SageMakerJobStepRetryPolicy,
                                                 StepExceptionTypeEnum, StepRetryPolicy)

    monkeypatch.setenv(MAX_INTERVAL_ENV, "0.2")   # the policy says 30 s, then 60 s: capped here
    internal = SageMakerJobStepRetryPolicy(failure_reason_types=[SageMakerJobExceptionTypeEnum.INTERNAL_ERROR],
                                           interval_seconds=30, backoff_rate=2.0, max_attempts=2)
    service = StepRetryPolicy(exception_types=[StepExceptionTypeEnum.SERVICE_FAULT, StepExceptionTypeEnum.THROTTLING],
                              interval_seconds=1, max_attempts=5)
    once = sdk.job("KilledOnce", KILLED_ONCE, arguments=[str(tmp_path / "once.marker")], retry_policies=[service, internal])
    always = sdk.job("KilledAlways", "os.kill(os.getpid(), signal.SIGKILL)", retry_policies=[internal])
    broken = sdk.job("ScriptError", "print('error: a bug in the script'); sys.exit(1)", retry_policies=[internal])
    unmatched = sdk.job("NoPolicyMatches", "os.kill(os.getpid(), signal.SIGKILL)", retry_policies=[service])
    definition = sdk.definition([once])
    assert definition["Steps"][0]["RetryPolicies"][1] == {"BackoffRate": 2.0, "IntervalSeconds": 30, "MaxAttempts": 2,
                                                          "ExceptionType": ["SageMaker.JOB_INTERNAL_ERROR"]}

    run = sdk.run(tmp_path, definition, "once")
    entry = run.steps["KilledOnce"]
    assert run.record["PipelineExecutionStatus"] == "Succeeded", run.record["FailureReason"]
    assert entry["StepStatus"] == "Succeeded" and entry["AttemptCount"] == 2 and entry["FailureReason"] is None
    assert run.output("KilledOnce", "done.json") is True
    text = "\n".join(run.lines)
    assert "attempt 1 failed (SageMaker.JOB_INTERNAL_ERROR)" in text and "retrying in 0.2 s" in text

    for step, attempts, why in ((always, 3, "killed by signal 9"), (broken, 1, "exit code 1"),
                                (unmatched, 1, "killed by signal 9")):
        run = sdk.run(tmp_path, sdk.definition([step]), step.name)
        entry = run.steps[step.name]
        assert entry["StepStatus"] == "Failed" and entry["AttemptCount"] == attempts, (step.name, entry)
        assert why in entry["FailureReason"] and run.record["PipelineExecutionStatus"] == "Failed"
        assert "\n".join(run.lines).count("retrying in 0.2 s") == attempts - 1


@pytest.mark.smoke
def test_retry_waits_follow_the_policy_up_to_the_local_cap(monkeypatch):
    policy = {"ExceptionType": ["SageMaker.CAPACITY_ERROR"], "IntervalSeconds": 3, "BackoffRate": 2.0, "MaxAttempts": 4}
    monkeypatch.setenv(MAX_INTERVAL_ENV, "100")
    assert [retry_wait(policy, attempts, 0) for attempts in (1, 2, 3, 4, 5)] == [3, 6, 12, 24, None]
    monkeypatch.delenv(MAX_INTERVAL_ENV)
    assert [retry_wait(policy, attempts, 0) for attempts in (1, 2, 3)] == [3, 5, 5], "capped at 5 s by default"
    expiring = {"ExceptionType": ["Step.THROTTLING"], "IntervalSeconds": 1, "BackoffRate": 1.0, "ExpireAfterMin": 2}
    assert retry_wait(expiring, 7, 119) == 1 and retry_wait(expiring, 7, 120) is None


# ----------------------------------------------------------------------------- parallelism
BARRIER = """\
mine, other = ARGS
open(mine, "w").write("started")
deadline = time.time() + 60
while not os.path.exists(other):   # only when both branches run at once does the other one start meanwhile
    if time.time() > deadline:
        print("error: the other branch never started while this one ran"); sys.exit(1)
    time.sleep(0.05)
print("both branches are running")
time.sleep(1.2)   # both run on, past a whole second of the records' timestamps
"""


def test_independent_branches_run_side_by_side_up_to_max_parallel_execution_steps(sdk, tmp_path):
    """The pipeline's ParallelismConfiguration (CreatePipeline's), as DescribePipelineExecution gives it."""
    left = sdk.job("Left", BARRIER, arguments=[str(tmp_path / "left"), str(tmp_path / "right")])
    right = sdk.job("Right", BARRIER, arguments=[str(tmp_path / "right"), str(tmp_path / "left")])
    join = sdk.job("Join", "", depends_on=[left, right])
    definition = sdk.definition([left, right, join])
    sagemaker = sdk.session.client("sagemaker")
    sagemaker.create_pipeline(PipelineName=sdk.pipeline, PipelineDefinition=json.dumps(definition), RoleArn=ROLE,
                              ParallelismConfiguration={"MaxParallelExecutionSteps": 2})
    arn = sagemaker.start_pipeline_execution(PipelineName=sdk.pipeline)["PipelineExecutionArn"]
    run = sdk.run(tmp_path, definition, arn.rsplit("/", 1)[-1])
    assert run.record["PipelineExecutionArn"] == arn
    assert run.record["PipelineExecutionStatus"] == "Succeeded", run.record["FailureReason"]
    assert run.record["ParallelismConfiguration"] == {"MaxParallelExecutionSteps": 2}
    a, b = run.steps["Left"], run.steps["Right"]
    assert a["StartTime"] < b["EndTime"] and b["StartTime"] < a["EndTime"], "the two jobs' times overlap"
    assert run.steps["Join"]["StartTime"] >= max(a["EndTime"], b["EndTime"])
    job_lines = [line for line in run.lines if "│" in line]
    assert {line.split("]", 1)[0] for line in job_lines} == {"[Left", "[Right"}, job_lines
    assert "[Left]     │ both branches are running" in run.lines and "[Right]     │ both branches are running" in run.lines
    for step in ("Left", "Right"):   # each job's own log holds its lines only, unlabelled
        assert (run.run_dir / "jobs" / step / "job.log").read_text() == "both branches are running\n"


def test_without_a_parallelism_configuration_steps_run_one_at_a_time_and_say_why(sdk, tmp_path):
    definition = sdk.definition([sdk.job(name, "") for name in ("First", "Second")])
    run = sdk.run(tmp_path, definition)
    assert run.record["PipelineExecutionStatus"] == "Succeeded", run.record["FailureReason"]
    first, second = run.steps["First"], run.steps["Second"]
    assert first["EndTime"] <= second["StartTime"]
    said = [line for line in run.lines if "could run side by side" in line]
    assert len(said) == 1 and "no ParallelismConfiguration" in said[0] and "SageMaker's default is 50" in said[0]
    assert not any(line.startswith("[") for line in run.lines), "one at a time: lines are not labelled"

    # the execution's configuration wins over the pipeline's, as StartPipelineExecution's does on SageMaker
    lines: list[str] = []
    executor = LocalExecutor(sdk.session, sdk.pipeline, definition, tmp_path / "home", tmp_path / "run-e2",
                             echo=lines.append, pipeline_parallelism={"MaxParallelExecutionSteps": 2})
    record = executor.start({}, sdk.arn("e2"), parallelism={"MaxParallelExecutionSteps": 1})
    assert record["PipelineExecutionStatus"] == "Succeeded" and not any("side by side" in line for line in lines)
    assert not any("steps at once" in line for line in lines)


# ----------------------------------------------------------------------------- selective execution, caching
CHAIN_LINK = """\
upstream = ARGS[1]
seen = json.load(open(os.path.join(upstream, "value.json"))) if os.path.isdir(upstream) else []
if int(ARGS[2]):
    print("error: asked to fail"); sys.exit(1)
write("value.json", seen + [ARGS[0]])
"""


def chain(sdk: Sdk):
    """A → B → C, each reading its upstream's value.json (B and C through an input) and adding its own mark."""
    from sagemaker.core.workflow.execution_variables import ExecutionVariables
    from sagemaker.core.workflow.functions import Join

    p = sdk.parameters(FailA=0)
    steps, upstream = [], None
    for name in "ABC":
        inputs = [sdk.input("upstream", upstream.properties.ProcessingOutputConfig.Outputs["out"].S3Output.S3Uri)] \
            if upstream else []
        mark = Join(on="@", values=[name, ExecutionVariables.PIPELINE_EXECUTION_ID])
        upstream = sdk.job(name, CHAIN_LINK, arguments=[mark, "/opt/ml/processing/input/upstream",
                                                        p["FailA"] if name == "A" else 0], inputs=inputs)
        steps.append(upstream)
    return sdk.definition(steps, p)


def test_selective_execution_runs_the_selected_steps_on_the_source_executions_outputs(sdk, tmp_path):
    definition = chain(sdk)
    source = sdk.run(tmp_path, definition, "source")
    assert source.output("C", "value.json") == ["A@source", "B@source", "C@source"]

    config = {"SourcePipelineExecutionArn": sdk.arn("source"), "SelectedSteps": [{"StepName": "C"}]}
    run = sdk.run(tmp_path, definition, "selected", selective=config)
    assert run.record["PipelineExecutionStatus"] == "Succeeded", run.record["FailureReason"]
    assert run.record["SelectiveExecutionConfig"] == config
    assert run.output("C", "value.json") == ["A@source", "B@source", "C@selected"], "C read B's output of the source"
    for name in "AB":   # listed as SageMaker lists them: the source's entry, with where it came from
        entry = run.steps[name]
        assert entry["SelectiveExecutionResult"] == {"SourcePipelineExecutionArn": sdk.arn("source")}
        assert {k: v for k, v in entry.items() if k != "SelectiveExecutionResult"} == source.steps[name]
    assert "SelectiveExecutionResult" not in run.steps["C"] and ran_a_job(run.steps["C"])
    assert sorted(p.name for p in (run.run_dir / "jobs").iterdir()) == ["C"]
    assert run.record["Properties"]["B"] == source.record["Properties"]["B"]


def test_selective_execution_is_refused_when_its_source_cannot_provide_the_outputs(sdk, tmp_path):
    definition = chain(sdk)
    failed = sdk.run(tmp_path, definition, "failed", values={"FailA": 1})
    assert failed.record["PipelineExecutionStatus"] == "Failed" and list(failed.steps) == ["A"]

    def refusal(execution: str, source: str, *selected: str) -> str:
        config = {"SourcePipelineExecutionArn": source, "SelectedSteps": [{"StepName": s} for s in selected]}
        message = sdk.refusal(tmp_path, definition, execution, selective=config)
        assert message.startswith("SelectiveExecutionConfig: "), message
        return message

    assert "needs step 'B', which did not succeed in source execution failed; select 'B' too" in \
        refusal("r1", sdk.arn("failed"), "C")
    succeeded = sdk.run(tmp_path, definition, "succeeded")
    assert succeeded.record["PipelineExecutionStatus"] == "Succeeded"
    assert "step 'B' lies between selected steps" in refusal("r2", sdk.arn("succeeded"), "A", "C")
    other = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:pipeline/another-pipeline/execution/succeeded"
    assert f"is not an execution of pipeline {sdk.pipeline}" in refusal("r3", other, "C")
    assert "no execution 'nothing'" in refusal("r4", sdk.arn("nothing"), "C")
    assert "['D'] are not steps of" in refusal("r5", sdk.arn("succeeded"), "D")


def test_caching_reuses_a_step_until_its_expire_after_has_passed(sdk, tmp_path):
    from sagemaker.mlops.workflow.steps import CacheConfig

    kept = sdk.job("Kept", "write('id.json', time.time_ns())", cache_config=CacheConfig(enable_caching=True,
                                                                                       expire_after="PT1H"))
    expired = sdk.job("Expired", "write('id.json', time.time_ns())",
                      cache_config=CacheConfig(enable_caching=True, expire_after="PT0S"))
    definition = sdk.definition([kept, expired])
    assert definition["Steps"][0]["CacheConfig"] == {"Enabled": True, "ExpireAfter": "PT1H"}
    first = sdk.run(tmp_path, definition, "first")
    second = sdk.run(tmp_path, definition, "second")
    assert second.steps["Kept"]["CacheHitResult"] == {"SourcePipelineExecutionArn": sdk.arn("first")}
    assert not ran_a_job(second.steps["Kept"]) and ran_a_job(second.steps["Expired"])
    assert second.steps["Expired"]["CacheHitResult"] is None
    assert second.record["Properties"]["Kept"] == first.record["Properties"]["Kept"]
    assert second.output("Expired", "id.json") != first.output("Expired", "id.json")


# ----------------------------------------------------------------------------- stopping
EXECUTOR_PROCESS = """\
import base64, json, os, sys
from pathlib import Path

spec = json.loads(Path(sys.argv[1]).read_text())
from moto import mock_aws
import boto3

with mock_aws():
    session = boto3.Session(region_name=spec["region"])
    s3 = session.client("s3")
    s3.create_bucket(Bucket=spec["bucket"])
    for key, body in spec["objects"].items():
        s3.put_object(Bucket=spec["bucket"], Key=key, Body=base64.b64decode(body))
    from flanops.pipelines.local import LocalExecutor

    executor = LocalExecutor(session, spec["pipeline"], spec["definition"], Path(spec["home"]), Path(spec["run_dir"]))
    try:
        record = executor.start({}, spec["arn"], parallelism=spec["parallelism"])
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
    print("status", record["PipelineExecutionStatus"], flush=True)
    sys.exit(0 if record["PipelineExecutionStatus"] == "Succeeded" else 1)
"""


@dataclass
class ExecutorProcess:
    process: subprocess.Popen | None   # None: the executor runs in this process
    record_path: Path

    def record(self) -> dict | None:
        try:
            return json.loads(self.record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def wait_until_executing(self, steps: list[str]) -> list[int]:
        """The pids of these steps' jobs, once all of them run."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process is None or self.process.poll() is None, self.process.communicate()
            entries = {s["StepName"]: s for s in (self.record() or {}).get("Steps", [])}
            pids = [entries.get(step, {}).get("Metadata", {}).get("Pid") for step in steps]
            if all(pids) and all(entries[step]["StepStatus"] == "Executing" for step in steps):
                return pids
            time.sleep(0.1)
        raise AssertionError(f"{steps} did not all start: {self.record()}")


def start_executor_process(sdk: Sdk, tmp_path: Path, definition: dict, parallelism: dict | None) -> ExecutorProcess:
    """The executor in a process of its own (moto in it, holding this pipeline's code objects), as `flanops run` is."""
    s3 = sdk.session.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{sdk.pipeline}/").get("Contents", [])]
    spec = {"region": REGION, "bucket": BUCKET, "pipeline": sdk.pipeline, "definition": definition,
            "home": str(tmp_path / "home"), "run_dir": str(tmp_path / "run"), "arn": sdk.arn("e1"),
            "parallelism": parallelism, "objects": {key: base64.b64encode(
                s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()).decode() for key in keys}}
    (tmp_path / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    (tmp_path / "executor.py").write_text(EXECUTOR_PROCESS, encoding="utf-8")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, str(tmp_path / "executor.py"), str(tmp_path / "spec.json")], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    return ExecutorProcess(process, records_dir(tmp_path / "home", sdk.pipeline) / "e1.json")


def alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def stop_and_collect(executor: ExecutorProcess, signum: int) -> tuple[int, str, str, dict]:
    try:
        executor.process.send_signal(signum)
        stdout, stderr = executor.process.communicate(timeout=60)
    finally:
        if executor.process.poll() is None:
            os.killpg(executor.process.pid, signal.SIGKILL)
            executor.process.wait()
    return executor.process.returncode, stdout, stderr, executor.record()


def test_sigterm_stops_an_execution_and_its_parallel_jobs_cleanly(sdk, tmp_path):
    """StopPipelineExecution's SIGTERM: both running branches' jobs are killed, their steps and the execution are
    Stopped, the record is saved, nothing after them starts and nothing prints a traceback."""
    left, right = (sdk.job(name, "print('sleeping', flush=True); time.sleep(300)") for name in ("Left", "Right"))
    after = sdk.job("After", "", depends_on=[left, right])
    executor = start_executor_process(sdk, tmp_path, sdk.definition([left, right, after]),
                                      {"MaxParallelExecutionSteps": 2})
    pids = executor.wait_until_executing(["Left", "Right"])
    code, stdout, stderr, record = stop_and_collect(executor, signal.SIGTERM)
    assert code == 1 and "status Stopped" in stdout, (code, stdout, stderr)
    assert "Traceback" not in stderr + stdout, stderr
    assert record["PipelineExecutionStatus"] == "Stopped" and record["FailureReason"] == STOPPED_BY_API
    steps = {s["StepName"]: s for s in record["Steps"]}
    assert sorted(steps) == ["Left", "Right"], "nothing starts after a stop"
    for name in ("Left", "Right"):
        assert steps[name]["StepStatus"] == "Stopped" and steps[name]["FailureReason"] == STOPPED_BY_API
        assert steps[name]["EndTime"] is not None
    assert not any(alive(pid) for pid in pids), "the stopped jobs' processes are gone"


def test_ctrl_c_stops_an_execution_with_the_interrupted_reason(sdk, tmp_path):
    sleeper = sdk.job("Sleeper", "print('sleeping', flush=True); time.sleep(300)")
    executor = start_executor_process(sdk, tmp_path, sdk.definition([sleeper]), None)
    [pid] = executor.wait_until_executing(["Sleeper"])
    code, stdout, stderr, record = stop_and_collect(executor, signal.SIGINT)
    assert code == 130 and "interrupted" in stdout and "Traceback" not in stderr, (code, stdout, stderr)
    assert record["PipelineExecutionStatus"] == "Stopped" and record["FailureReason"] == INTERRUPTED
    [entry] = record["Steps"]
    assert entry["StepStatus"] == "Stopped" and entry["FailureReason"] == INTERRUPTED
    assert not alive(pid)



def test_a_stop_from_another_thread_kills_a_job_that_ignores_sigterm(sdk, tmp_path, monkeypatch):
    """Where the executor does not run in the main thread (no signal handlers there), ``stop`` stops it; a job that
    ignores SIGTERM is killed when the grace period ends."""
    import threading

    from flanops.pipelines import scheduler

    monkeypatch.setattr(scheduler, "KILL_AFTER_SECONDS", 0.5)
    stubborn = sdk.job("Stubborn", "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ignoring SIGTERM', "
                                   "flush=True); time.sleep(300)")
    executor = LocalExecutor(sdk.session, sdk.pipeline, sdk.definition([stubborn]), tmp_path / "home",
                             tmp_path / "run", echo=lambda line: None)
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(record=executor.start({}, sdk.arn("e1"))))
    thread.start()
    watcher = ExecutorProcess(None, records_dir(tmp_path / "home", sdk.pipeline) / "e1.json")
    try:
        [pid] = watcher.wait_until_executing(["Stubborn"])
        log = tmp_path / "run" / "jobs" / "Stubborn" / "job.log"
        deadline = time.monotonic() + 30
        while "ignoring SIGTERM" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)   # its handler is set once it has printed
    finally:
        executor.stop("stopped by the test")
        thread.join(timeout=60)
    record = outcome["record"]
    assert record["PipelineExecutionStatus"] == "Stopped" and record["FailureReason"] == "stopped by the test"
    [entry] = record["Steps"]
    assert entry["StepStatus"] == "Stopped" and entry["FailureReason"] == "stopped by the test"
    assert not alive(pid), "SIGKILL after the grace period"

# ----------------------------------------------------------------------------- refused before anything starts
def lambda_step(sdk: Sdk):
    from sagemaker.core.lambda_helper import Lambda
    from sagemaker.mlops.workflow.lambda_step import LambdaOutput, LambdaOutputTypeEnum, LambdaStep

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        function = Lambda(function_arn=f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:notify",
                          session=sdk.pipeline_session)
    return LambdaStep(name="Notify", lambda_func=function, inputs={"stage": "beta"},
                      outputs=[LambdaOutput(output_name="answer", output_type=LambdaOutputTypeEnum.String)])


def emr_step(sdk: Sdk):
    from sagemaker.mlops.workflow.emr_step import EMRStep, EMRStepConfig

    return EMRStep(name="Spark", display_name="Spark", description="a Spark job", cluster_id="j-0123456789ABC",
                   step_config=EMRStepConfig(jar=f"s3://{BUCKET}/spark.jar"))


def tuning_step(sdk: Sdk):
    from sagemaker.core.parameter import ContinuousParameter
    from sagemaker.mlops.workflow.steps import TuningStep
    from sagemaker.train import ModelTrainer
    from sagemaker.train.configs import Compute, SourceCode
    from sagemaker.train.tuner import HyperparameterTuner

    source = sdk.folder / "tuning"
    source.mkdir(parents=True)
    (source / "train.py").write_text("print('loss=0.5')\n")
    trainer = ModelTrainer(training_image=IMAGE, role=ROLE, sagemaker_session=sdk.pipeline_session,
                           source_code=SourceCode(source_dir=str(source), entry_script="train.py"),
                           compute=Compute(instance_type="ml.m5.large", instance_count=1), hyperparameters={"lr": 0.1})
    tuner = HyperparameterTuner(model_trainer=trainer, objective_metric_name="loss", objective_type="Minimize",
                                hyperparameter_ranges={"lr": ContinuousParameter(0.01, 0.2)},
                                metric_definitions=[{"Name": "loss", "Regex": "loss=(.*)"}], max_jobs=2,
                                max_parallel_jobs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TuningStep(name="Tune", step_args=tuner.tune())


def automl_step(sdk: Sdk):
    """sagemaker 3.27's AutoMLStep cannot be constructed (it checks its step_args against ``Session.auto_ml``, which
    v3's Session no longer has), so the SDK's own step class is given what ``AutoML.fit()`` gave it in v2."""
    from sagemaker.mlops.workflow.automl_step import AutoMLStep
    from sagemaker.mlops.workflow.steps import ConfigurableRetryStep, StepTypeEnum

    class FittedAutoMLStep(AutoMLStep):
        def __init__(self, name: str):
            ConfigurableRetryStep.__init__(self, name, StepTypeEnum.AUTOML)
            self.cache_config = None

        @property
        def arguments(self):
            return {"AutoMLJobConfig": {"Mode": "ENSEMBLING"}, "RoleArn": ROLE,
                    "InputDataConfig": [{"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix",
                                                                         "S3Uri": f"s3://{BUCKET}/train.csv"}},
                                         "TargetAttributeName": "y"}],
                    "OutputDataConfig": {"S3OutputPath": f"s3://{BUCKET}/automl"}}

    return FittedAutoMLStep("AutoPilot")


def check_job_config(sdk: Sdk):
    from sagemaker.mlops.workflow.check_job_config import CheckJobConfig

    return CheckJobConfig(role=ROLE, instance_count=1, instance_type="ml.m5.large", sagemaker_session=sdk.pipeline_session)


def clarify_check_step(sdk: Sdk):
    from sagemaker.core.clarify import BiasConfig, DataConfig
    from sagemaker.mlops.workflow.clarify_check_step import ClarifyCheckStep, DataBiasCheckConfig

    data = DataConfig(s3_data_input_path=f"s3://{BUCKET}/data.csv", s3_output_path=f"s3://{BUCKET}/bias", label="y",
                      headers=["y", "x"], dataset_type="text/csv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ClarifyCheckStep(name="Bias", check_job_config=check_job_config(sdk), clarify_check_config=
                                DataBiasCheckConfig(data_config=data, data_bias_config=BiasConfig(
                                    label_values_or_threshold=[1], facet_name="x")))


def quality_check_step(sdk: Sdk):
    from sagemaker.core.model_monitor.dataset_format import DatasetFormat
    from sagemaker.mlops.workflow.quality_check_step import DataQualityCheckConfig, QualityCheckStep

    config = DataQualityCheckConfig(baseline_dataset=f"s3://{BUCKET}/data.csv", dataset_format=DatasetFormat.csv(),
                                    output_s3_uri=f"s3://{BUCKET}/quality")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return QualityCheckStep(name="Quality", quality_check_config=config, check_job_config=check_job_config(sdk))


def callback_step(sdk: Sdk):
    from sagemaker.mlops.workflow.callback_step import CallbackOutput, CallbackStep

    return CallbackStep(name="Approval", sqs_queue_url=f"https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/approvals",
                        inputs={"model": "candidate"}, outputs=[CallbackOutput(output_name="approved")])


def notebook_job_step(sdk: Sdk):
    from sagemaker.mlops.workflow.notebook_job_step import NotebookJobStep

    notebook = sdk.folder / "report.ipynb"
    notebook.parent.mkdir(parents=True, exist_ok=True)
    notebook.write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return NotebookJobStep(name="Report", input_notebook=str(notebook), image_uri=IMAGE, kernel_name="python3",
                           role=ROLE, s3_root_uri=f"s3://{BUCKET}/notebooks")


# each step the executor refuses → how the SDK builds one, its name, the Type the SDK writes, what the refusal says
REFUSED_STEPS = {
    "Lambda": (lambda_step, "Notify", "Lambda", "a Lambda step invokes an AWS Lambda function"),
    "EMR": (emr_step, "Spark", "EMR", "an EMR step submits work to an Amazon EMR cluster"),
    "Tuning": (tuning_step, "Tune", "Tuning", "a Tuning step starts a hyperparameter tuning job"),
    "AutoML": (automl_step, "AutoPilot", "AutoML", "an AutoML step starts an Autopilot job"),
    "ClarifyCheck": (clarify_check_step, "Bias", "ClarifyCheck", "a ClarifyCheck step runs SageMaker Clarify's"),
    "QualityCheck": (quality_check_step, "Quality", "QualityCheck", "a QualityCheck step runs SageMaker Model Monitor"),
    "Callback": (callback_step, "Approval", "Callback", "a Callback step waits for an outside system"),
    "NotebookJob": (notebook_job_step, "Report", "Training", "a NotebookJobStep runs a notebook"),
}


@pytest.mark.smoke
@pytest.mark.parametrize("kind", sorted(REFUSED_STEPS))
def test_a_step_type_the_executor_does_not_run_is_refused_before_anything_starts(sdk, tmp_path, kind):
    build, name, step_type, why = REFUSED_STEPS[kind]
    first = sdk.job("First", "write('ran.json', True)")
    refused = build(sdk)
    refused.add_depends_on([first])
    definition = sdk.definition([first, refused])
    assert {s["Name"]: s["Type"] for s in definition["Steps"]} == {"First": "Processing", name: step_type}
    message = sdk.refusal(tmp_path, definition)
    assert message.startswith(f"step {name!r}: {why}"), message
    assert "`flanops run --aws`" in message, "the refusal says what to do"


def test_references_to_nothing_and_cycles_are_refused_before_anything_starts(sdk, tmp_path):
    """Definitions the SDK wrote, edited by hand afterwards: each broken reference is refused in one line that names
    the step and the construct; so is a pipeline parameter the definition does not declare."""
    from sagemaker.core.workflow.conditions import ConditionEquals
    from sagemaker.core.workflow.functions import JsonGet
    from sagemaker.core.workflow.properties import PropertyFile
    from sagemaker.mlops.workflow.condition_step import ConditionStep

    p = sdk.parameters(Stage="beta")
    report = PropertyFile(name="Report", output_name="out", path="report.json")
    first = sdk.job("First", "", arguments=[p["Stage"]], property_files=[report])
    second = sdk.job("Second", "", depends_on=[first])
    gate = ConditionStep(name="Gate", conditions=[ConditionEquals(
        left=JsonGet(step_name="First", property_file=report, json_path="x"), right=1)], if_steps=[], else_steps=[])
    built = sdk.definition([first, second, gate], p)

    def edited(change) -> dict:
        definition = json.loads(json.dumps(built))
        change({s["Name"]: s for s in definition["Steps"]})
        return definition

    cases = {
        "parameter": (lambda s: s["First"]["Arguments"]["AppSpecification"]["ContainerArguments"].__setitem__(
            1, {"Get": "Parameters.Stag"}), "step 'First': Get Parameters.Stag names a parameter the definition "
                                            "does not declare"),
        "step": (lambda s: s["Second"].__setitem__("DependsOn", ["Frist"]),
                 "step 'Second': DependsOn names 'Frist', which is not a step of this pipeline"),
        "property file": (lambda s: s["First"].__setitem__("PropertyFiles", []),
                          "step 'Gate': JsonGet reads property file 'Report' of step 'First', which declares none"),
        "execution variable": (lambda s: s["Second"]["Arguments"]["AppSpecification"]["ContainerArguments"].append(
            {"Get": "Execution.TrainingJobName"}), "step 'Second': Get Execution.TrainingJobName has a value only in "
                                                   "a Training step's arguments"),
        "cycle": (lambda s: s["First"].__setitem__("DependsOn", ["Second"]),
                  "DependsOn and property references form a cycle (First → Second → First)"),
    }
    for case, (change, expected) in cases.items():
        message = sdk.refusal(tmp_path, edited(change), case.replace(" ", "-"))
        assert expected in message, (case, message)
    message = sdk.refusal(tmp_path, built, "unknown-parameter", values={"Stages": "prod"})
    assert "pipeline parameter(s) ['Stages'] are not in the definition, which has ['Stage']" in message
