"""Run a SageMaker pipeline definition on this machine, against embedded (or any) S3 and SageMaker APIs.

The executor keeps no list of steps of its own: it reads the definition JSON (stepgraph.py orders
its steps, condition branches included), resolves parameters, ``Get``, ``Std:Join``,
``Std:JsonGet`` and conditions (expressions.py), and runs each job the way SageMaker would run it:
Processing and Training jobs under the container contract in a sandbox (jobs.py), Transform jobs
through the model's own handler (transform.py), ``@step`` functions through the SDK's own invoker
(functionstep.py). Condition, Fail, RegisterModel (the model package lands in the registry) and
Model steps (createmodel.py: the model lands in SageMaker) run too. Jobs with caching enabled reuse
an earlier run's outputs when their resolved arguments are unchanged (stepcache.py). Jobs run one at
a time: branches that SageMaker runs in parallel run in definition order here (each job uses every
core anyway). Each execution's record is kept by records.py.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

from .createmodel import create_model
from .expressions import Context, evaluate_condition, format_value, walk_path
from .failures import AwsUnreachable, StepFailed, known_failure
from .files import write_json_atomic
from .functionstep import is_function_step, run_function
from .jobs import JobRunner, job_name
from .records import records_dir, utcnow
from .stepcache import StepCache
from .stepgraph import StepGraph
from .transform import run_transform

JOB_TYPES = ("Processing", "Training", "Transform")


@dataclass
class LocalExecutor:
    """Executes one pipeline's definition; ``session`` is a boto3 Session on the target AWS."""

    session: Any
    pipeline_name: str
    definition: dict
    home: Path
    run_dir: Path
    echo: Callable[[str], None] = print
    job_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sagemaker = self.session.client("sagemaker")
        self.jobs = JobRunner(self.session, self.echo, self.job_env)
        self.cache = StepCache(self.home / "cache" / self.pipeline_name, self.jobs.s3, self.echo)
        self.graph = StepGraph.of(self.definition)
        self.steps = self.graph.steps
        self.branch_of = self.graph.branch_of

    # -- executions
    def start(self, parameters: dict[str, Any], execution_arn: str) -> dict:
        execution_id = execution_arn.rsplit("/", 1)[-1]
        defaults = {p["Name"]: p.get("DefaultValue") for p in self.definition.get("Parameters", [])}
        unknown = set(parameters) - set(defaults)
        if unknown:
            raise StepFailed(f"unknown pipeline parameter(s) {sorted(unknown)}; the definition has {sorted(defaults)}")
        record = {
            "PipelineName": self.pipeline_name, "PipelineExecutionArn": execution_arn, "ExecutionId": execution_id,
            "PipelineExecutionStatus": "Executing", "CreationTime": utcnow(), "LastModifiedTime": utcnow(),
            "FailureReason": None, "Parameters": {**defaults, **parameters}, "RunDir": str(self.run_dir),
            "ExecutorPid": os.getpid(), "Steps": [], "Properties": {}, "PropertyFiles": {},
        }
        write_json_atomic(self.run_dir / "definition.json", self.definition)
        return self.execute(record)

    def resume(self, record: dict) -> dict:
        """Rerun the failed step and everything after it; succeeded steps keep their outputs."""
        succeeded = {s["StepName"] for s in record["Steps"] if s["StepStatus"] == "Succeeded"}
        record["Steps"] = [s for s in record["Steps"] if s["StepName"] in succeeded]
        record["Properties"] = {k: v for k, v in record["Properties"].items() if k in succeeded}
        record["PropertyFiles"] = {k: v for k, v in record["PropertyFiles"].items() if k.split(".")[0] in succeeded}
        record.update(PipelineExecutionStatus="Executing", FailureReason=None, Resumable=True,
                      ExecutorPid=os.getpid(), LastModifiedTime=utcnow())
        return self.execute(record)

    def execute(self, record: dict) -> dict:
        ctx = Context(record["ExecutionId"], record["PipelineExecutionArn"], self.pipeline_name,
                      record["Parameters"], record["Properties"], record["PropertyFiles"])
        done = {s["StepName"] for s in record["Steps"] if s["StepStatus"] == "Succeeded"}
        decisions = {s["StepName"]: s["Metadata"].get("Condition", {}).get("Outcome") == "True"
                     for s in record["Steps"] if s["StepType"] == "Condition" and s["StepName"] in done}
        self.save(record)
        try:
            for name in self.graph.order():
                if name in done:
                    continue
                if name in self.branch_of:
                    condition, branch = self.branch_of[name]
                    if decisions.get(condition) != branch:
                        continue   # the other branch was taken: SageMaker does not list this step
                self.run_step(name, ctx, record, decisions)
            record["PipelineExecutionStatus"] = "Succeeded"
        except StepFailed as failure:
            record["PipelineExecutionStatus"] = "Failed"
            record["FailureReason"] = str(failure)
            record["Resumable"] = not isinstance(failure, AwsUnreachable)
        except KeyboardInterrupt:
            record["PipelineExecutionStatus"] = "Stopped"
            record["FailureReason"] = "interrupted (Ctrl-C); `flanops run --resume` continues it"
            for step in record["Steps"]:
                if step["StepStatus"] in ("Starting", "Executing"):
                    step.update(StepStatus="Stopped", EndTime=utcnow(), FailureReason="interrupted")
            self.save(record)
            raise
        record["LastModifiedTime"] = utcnow()
        self.save(record)
        return record

    def save(self, record: dict) -> None:
        write_json_atomic(records_dir(self.home, self.pipeline_name) / f"{record['ExecutionId']}.json", record)

    def run_step(self, name: str, ctx: Context, record: dict, decisions: dict[str, bool]) -> None:
        step = self.steps[name]
        entry = {"StepName": name, "StepType": step["Type"], "StepStatus": "Executing", "StartTime": utcnow(),
                 "EndTime": None, "Metadata": {}, "CacheHitResult": None, "FailureReason": None}
        record["Steps"].append(entry)
        self.save(record)
        started = time.perf_counter()
        self.echo(f"==> {name} ({step['Type']})")
        try:
            if step["Type"] in JOB_TYPES:
                self.run_job(step, ctx, record, entry)
            elif step["Type"] == "Condition":
                outcome = all(evaluate_condition(c, ctx, name) for c in step["Arguments"]["Conditions"])
                decisions[name] = outcome
                entry["Metadata"]["Condition"] = {"Outcome": str(outcome)}
                self.echo(f"    conditions {'met' if outcome else 'not met'}: "
                          f"{'IfSteps' if outcome else 'ElseSteps'} run")
            elif step["Type"] == "Fail":
                message = format_value(ctx.resolve(step["Arguments"].get("ErrorMessage", ""), name))
                entry["Metadata"]["Fail"] = {"ErrorMessage": message}
                raise StepFailed(message)
            elif step["Type"] == "RegisterModel":
                arn = self.register(ctx.resolve(step["Arguments"], name))
                ctx.properties[name] = {"ModelPackageArn": arn}
                entry["Metadata"]["RegisterModel"] = {"Arn": arn}
                self.echo(f"    registered {arn}")
            elif step["Type"] == "Model":
                ctx.properties[name], arn = create_model(self.sagemaker, name, job_name(
                    self.pipeline_name, name, ctx.execution_id), ctx.resolve(step["Arguments"], name))
                entry["Metadata"]["Model"] = {"Arn": arn}
                self.echo(f"    created model {ctx.properties[name]['ModelName']}")
            else:
                raise StepFailed(f"{name}: step type {step['Type']} is not supported by the local executor")
        except Exception as error:
            failure = error if isinstance(error, StepFailed) else known_failure(
                name, error, self.job_env.get("AWS_ENDPOINT_URL"), self.run_dir)
            if failure is None:
                raise
            entry.update(StepStatus="Failed", FailureReason=str(failure), EndTime=utcnow(),
                         DurationSeconds=round(time.perf_counter() - started, 1))
            self.save(record)
            raise failure from None
        entry.update(StepStatus="Succeeded", EndTime=utcnow(), DurationSeconds=round(time.perf_counter() - started, 1))
        self.save(record)

    # -- jobs
    def run_job(self, step: dict, ctx: Context, record: dict, entry: dict) -> None:
        name = step["Name"]
        key = self.cache.key(step, ctx)
        cache = step.get("CacheConfig", {})
        if cache.get("Enabled") and self.cache.reuse(name, key, cache, ctx, entry):
            return
        arguments = ctx.resolve(step["Arguments"], name)
        sandbox = self.run_dir / "jobs" / name
        properties = self.job_runner(step)(name, job_name(self.pipeline_name, name, ctx.execution_id), arguments,
                                           sandbox, entry, lambda: self.save(record))
        ctx.properties[name] = properties
        files = {}
        for spec in step.get("PropertyFiles", []):
            output = walk_path(arguments, f"ProcessingOutputConfig.Outputs['{spec['OutputName']}']", name)
            path = sandbox / output["S3Output"]["LocalPath"].lstrip("/") / spec["FilePath"]
            try:
                files[spec["PropertyFileName"]] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as err:
                raise StepFailed(f"{name}: property file {spec['FilePath']} unreadable ({err})") from None
        for file_name, document in files.items():
            ctx.property_files[f"{name}.{file_name}"] = document
        self.cache.store(name, key, ctx, properties, files, sandbox, entry["Metadata"])

    def job_runner(self, step: dict) -> Callable[..., dict]:
        """The job's kind: each runs (name, job name, arguments, sandbox, entry, started) and returns its properties."""
        if step["Type"] == "Transform":
            return partial(run_transform, self.jobs)
        if is_function_step(step):   # the SDK's @step: a Training step that runs the remote-function invoker
            return partial(run_function, self.jobs)
        return self.jobs.run_processing if step["Type"] == "Processing" else self.jobs.run_training

    def register(self, arguments: dict) -> str:
        group = arguments["ModelPackageGroupName"]
        from botocore.exceptions import ClientError

        try:
            self.sagemaker.describe_model_package_group(ModelPackageGroupName=group)
        except ClientError:
            self.sagemaker.create_model_package_group(
                ModelPackageGroupName=group, ModelPackageGroupDescription=f"created by {self.pipeline_name}")
        request = {k: v for k, v in arguments.items() if v not in ({}, None)}
        metrics = request.get("ModelMetrics")
        if metrics:
            request["ModelMetrics"] = {k: v for k, v in metrics.items() if v}
        try:
            return self.sagemaker.create_model_package(**request)["ModelPackageArn"]
        except ClientError as err:
            raise StepFailed(f"RegisterModel: {err}") from None

