"""Run a SageMaker pipeline definition on this machine, against embedded (or any) S3 and SageMaker APIs.

The executor keeps no list of steps of its own: it reads the definition JSON, refuses before anything
starts what it cannot run (validation.py: one line naming the step, the construct and what to do), and
runs the rest: scheduler.py decides when each step runs and how many at once (ParallelismConfiguration)
and stops the execution on SIGTERM or Ctrl-C; expressions.py resolves parameters, execution variables,
``Get``, ``Std:Join``, ``Std:JsonGet`` and conditions; each job runs the way SageMaker would run it:
Processing and Training jobs under the container contract in a sandbox (jobs.py), Transform jobs
through the model's own handler (transform.py), ``@step`` functions through the SDK's own invoker
(functionstep.py). Condition, Fail, RegisterModel (the model package lands in the registry) and Model
steps (createmodel.py: the model lands in SageMaker) run too. A step is attempted again as its
RetryPolicies allow (retries.py). Steps with caching enabled reuse an earlier run's outputs when their
resolved arguments are unchanged (stepcache.py). ``selective`` runs only some steps, the others'
outputs from a source execution (selective.py). Each execution's record is kept by records.py; its
step entries have the shape of ListPipelineExecutionSteps' PipelineExecutionStep.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

from .createmodel import create_model
from .expressions import Context, evaluate_condition, format_value, job_name, walk_path
from .failures import AwsUnreachable, DefinitionRefused, StepFailed, known_failure
from .files import write_json_atomic, write_text_atomic
from .functionstep import is_function_step, run_function
from .jobs import JobRunner
from .records import records_dir, utcnow
from .retries import matching_policy, max_interval, retry_wait
from .s3 import split_s3_uri
from .scheduler import FAILED, STEP_THREAD, STOPPED, SUCCEEDED, Scheduler, max_parallel_steps
from .selective import selective_plan
from .stepcache import StepCache
from .stepgraph import StepGraph
from .transform import run_transform
from .validation import check_definition

JOB_TYPES = ("Processing", "Training", "Transform")
# what run_step runs ("Function": the SDK's @step, a Training step run by its invoker); validation refuses the rest
STEP_TYPES = (*JOB_TYPES, "Condition", "Fail", "RegisterModel", "Model", "Function")
REFUSAL_FILE = "refused.txt"   # a refused execution's run folder holds only this


@dataclass
class LocalExecutor:
    """Executes one pipeline's definition; ``session`` is a boto3 Session on the target AWS.
    ``pipeline_parallelism`` is the pipeline's own ParallelismConfiguration (CreatePipeline's), if any."""

    session: Any
    pipeline_name: str
    definition: dict
    home: Path
    run_dir: Path
    echo: Callable[[str], None] = print
    job_env: dict[str, str] = field(default_factory=dict)
    pipeline_parallelism: dict | None = None

    def __post_init__(self) -> None:
        self.lock = threading.RLock()   # the record: steps run in threads of their own
        self.echo_lock = threading.Lock()
        self.print = self.echo
        self.echo = self.say
        self.sagemaker = self.session.client("sagemaker")
        self.jobs = JobRunner(self.session, self.echo, self.job_env)
        self.cache = StepCache(self.home / "cache" / self.pipeline_name, self.jobs.s3, self.echo)
        self.graph = StepGraph.of(self.definition)
        self.steps = self.graph.steps
        self.branch_of = self.graph.branch_of
        self.failures: dict[str, StepFailed] = {}
        self.stopping = threading.Event()
        self.stop_reason: str | None = None
        self.scheduler: Scheduler | None = None

    def say(self, line: str) -> None:
        """Echo one line whole; with steps side by side, labelled with the step it is about."""
        thread = threading.current_thread().name
        label = f"[{thread.removeprefix(STEP_THREAD)}] " if self.jobs.labelled and thread.startswith(STEP_THREAD) else ""
        with self.echo_lock:
            self.print(label + line)

    # -- executions
    def start(self, parameters: dict[str, Any], execution_arn: str, selective: dict | None = None,
              parallelism: dict | None = None) -> dict:
        """Run a new execution. ``selective`` is StartPipelineExecution's SelectiveExecutionConfig and
        ``parallelism`` its ParallelismConfiguration (which wins over the pipeline's); without one, the
        execution's as the SageMaker API it runs against describes it."""
        execution_id = execution_arn.rsplit("/", 1)[-1]
        defaults = {p["Name"]: p.get("DefaultValue") for p in self.definition.get("Parameters", [])}
        record = {
            "PipelineName": self.pipeline_name, "PipelineExecutionArn": execution_arn, "ExecutionId": execution_id,
            "PipelineExecutionStatus": "Executing", "CreationTime": utcnow(), "LastModifiedTime": utcnow(),
            "FailureReason": None, "Parameters": {**defaults, **parameters}, "RunDir": str(self.run_dir),
            "ExecutorPid": os.getpid(), "Steps": [], "Properties": {}, "PropertyFiles": {},
        }
        parallelism = parallelism or self.described_parallelism(execution_arn)
        if parallelism:
            record["ParallelismConfiguration"] = parallelism
        try:
            check_definition(self.definition, STEP_TYPES, parameters)
            if selective is not None:
                plan = selective_plan(selective, self.graph, self.home, self.pipeline_name)
                record.update(SelectiveExecutionConfig=plan.config, Steps=plan.entries, Properties=plan.properties,
                              PropertyFiles=plan.property_files)
        except DefinitionRefused as refusal:
            record.update(PipelineExecutionStatus="Failed", FailureReason=str(refusal), Resumable=False)
            self.save(record)
            write_text_atomic(self.run_dir / REFUSAL_FILE, f"{refusal}\n")
            raise
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
                      record["Parameters"], record["Properties"], record["PropertyFiles"],
                      start_time=record["CreationTime"], read_s3=self.read_s3)
        outcomes = {s["StepName"]: SUCCEEDED for s in record["Steps"] if s["StepStatus"] == SUCCEEDED}
        decisions = {s["StepName"]: s["Metadata"].get("Condition", {}).get("Outcome") == "True"
                     for s in record["Steps"] if s["StepType"] == "Condition" and s["StepName"] in outcomes}
        selected = record.get("SelectiveExecutionConfig", {}).get("SelectedSteps")
        runnable = {s["StepName"] for s in selected} if selected else set(self.steps)
        parallel, configured = max_parallel_steps([record.get("ParallelismConfiguration"),
                                                   self.definition.get("ParallelismConfiguration"),
                                                   self.pipeline_parallelism])
        self.jobs.labelled = parallel > 1
        if parallel > 1:
            self.echo(f"running up to {parallel} steps at once (MaxParallelExecutionSteps); each line of a step's "
                      "output is labelled with its name")
        self.scheduler = Scheduler(self.graph, lambda name: self.run_step(name, ctx, record, decisions), decisions,
                                   self.stop_jobs, self.echo, parallel, configured)
        self.save(record)
        scheduler = self.scheduler
        scheduler.execute(outcomes, runnable)
        with self.lock:
            failed = sorted(name for name, status in outcomes.items() if status == FAILED)
            if scheduler.error is not None:
                reason = f"the local executor failed in step {scheduler.halted}: {scheduler.error!r}"
                record.update(PipelineExecutionStatus="Failed", Resumable=True, FailureReason=reason)
                for entry in record["Steps"]:
                    if entry["StepStatus"] == "Executing":
                        entry.update(StepStatus="Failed", EndTime=utcnow(), FailureReason=reason)
            elif scheduler.stop_reason:
                record.update(PipelineExecutionStatus="Stopped", FailureReason=scheduler.stop_reason)
            elif scheduler.halted:
                failure = self.failures[scheduler.halted]
                record.update(PipelineExecutionStatus="Failed", FailureReason=str(failure),
                              Resumable=not isinstance(failure, AwsUnreachable))
            elif failed:
                record.update(PipelineExecutionStatus="CompletedWithFailures",
                              FailureReason=f"step(s) {', '.join(failed)} failed; the steps whose DependsOn run "
                                            "conditions wait for that failure ran")
            else:
                record["PipelineExecutionStatus"] = "Succeeded"
            record["LastModifiedTime"] = utcnow()
            self.save(record)
        if scheduler.error is not None:
            raise scheduler.error
        if scheduler.stop_signal == signal.SIGINT:
            raise KeyboardInterrupt   # after the record is saved: the CLI says "interrupted", as for any Ctrl-C
        return record

    def described_parallelism(self, execution_arn: str) -> dict | None:
        """DescribePipelineExecution's ParallelismConfiguration (the pipeline's when the execution set none)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            described = self.sagemaker.describe_pipeline_execution(PipelineExecutionArn=execution_arn)
        except (ClientError, BotoCoreError):
            return None   # an execution the API does not know: the executor was started on its own
        return described.get("ParallelismConfiguration") or None

    def stop(self, reason: str) -> None:
        """Stop the running execution from another thread (as SIGTERM does in the main one)."""
        if self.scheduler is not None:
            self.scheduler.request_stop(reason)

    def stop_jobs(self, reason: str, force: bool) -> None:
        self.stop_reason = self.stop_reason or reason
        self.stopping.set()
        self.jobs.stop_all(reason, force)

    def save(self, record: dict) -> None:
        with self.lock:
            # one C-encoder call is a consistent snapshot while step threads update their entries
            snapshot = json.loads(json.dumps(record, default=str))
            write_json_atomic(records_dir(self.home, self.pipeline_name) / f"{record['ExecutionId']}.json", snapshot)

    def read_s3(self, uri: str) -> bytes:
        from botocore.exceptions import ClientError

        bucket, key = split_s3_uri(uri)
        try:
            return self.jobs.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as err:
            raise StepFailed(f"cannot read {uri} ({err.response.get('Error', {}).get('Code')})") from None

    # -- steps
    def run_step(self, name: str, ctx: Context, record: dict, decisions: dict[str, bool]) -> str:
        """Run one step, again as its retry policies allow; returns its StepStatus."""
        step = self.steps[name]
        entry = {"StepName": name, "StepType": step["Type"], "StepStatus": "Executing", "StartTime": utcnow(),
                 "EndTime": None, "Metadata": {}, "CacheHitResult": None, "FailureReason": None, "AttemptCount": 1}
        entry.update({key: step[field_name] for key, field_name in (("StepDisplayName", "DisplayName"),
                                                                    ("StepDescription", "Description"))
                      if step.get(field_name)})
        with self.lock:
            record["Steps"].append(entry)
            self.save(record)
        started, ctx = time.perf_counter(), ctx.for_step(name, step["Type"])
        while True:
            failure = self.attempt(name, step, ctx, record, entry, decisions)
            if failure is None or not self.retry(step, entry, failure, started):
                break
        status = SUCCEEDED if failure is None else STOPPED if self.stopping.is_set() else FAILED
        with self.lock:
            entry.update(StepStatus=status, EndTime=utcnow(), DurationSeconds=round(time.perf_counter() - started, 1))
            if failure is not None:
                entry["FailureReason"] = self.stop_reason if status == STOPPED else str(failure)
                self.failures[name] = failure
            self.save(record)
        return status

    def attempt(self, name: str, step: dict, ctx: Context, record: dict, entry: dict,
                decisions: dict[str, bool]) -> StepFailed | None:
        """One attempt at a step: None when it succeeded, else its failure."""
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
            return failure
        return None

    def retry(self, step: dict, entry: dict, failure: StepFailed, started: float) -> bool:
        """Wait as the step's retry policy for this failure says and return True; False when none applies."""
        policy = matching_policy(step, failure.exception_type)
        wait = None if policy is None else retry_wait(policy, entry["AttemptCount"], time.perf_counter() - started)
        if wait is None or self.stopping.is_set():
            return False
        self.echo(f"    attempt {entry['AttemptCount']} failed ({failure.exception_type}): {failure}")
        self.echo(f"    retrying in {wait:g} s as its RetryPolicies allow (IntervalSeconds x BackoffRate, capped at "
                  f"{max_interval():g} s here)")
        if self.stopping.wait(wait):
            return False
        with self.lock:
            entry["AttemptCount"] += 1
        return True

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
            raise known_failure("RegisterModel", err, None) or StepFailed(f"RegisterModel: {err}") from None
