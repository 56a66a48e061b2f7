"""The SageMaker API on embedded AWS tells what the local executor did.

moto keeps a pipeline execution as a stub that is ``Succeeded`` the moment it starts, and has no
ListPipelineExecutionSteps, StopPipelineExecution or RetryPipelineExecution. Every execution on
embedded AWS is run by a local executor, which keeps one record per execution under the flanops
home (records.py); this module, installed into the embedded server process (embedded_server.py),
answers the pipeline-execution calls from those records, so boto3, the AWS CLI and the SageMaker
SDK (``execution.describe()``, ``wait()``, ``list_steps()``, ``result()``) see the truth:

- DescribePipelineExecution, ListPipelineExecutions: status, failure reason and times from the record;
- ListPipelineExecutionSteps: the record's steps (status, times, cache hit, failure, job ARNs …);
- StartPipelineExecution: moto registers it; unless ``flanops run`` started it (it runs its own
  executor, and says so with its client token), a detached local executor runs it
  (execution_process.py), with its SelectiveExecutionConfig;
- StopPipelineExecution: SIGTERM to the execution's executor, which stops its job and records Stopped;
- RetryPipelineExecution: a detached executor resumes it, as ``flanops run --resume`` does.

The SageMaker Runtime's InvokeEndpoint is answered by the local endpoint that serves that name
(``flanops serve``; infra/endpoint_client.py finds it) instead of moto's placeholder.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import botocore.session
from moto.core.responses import ActionResult
from moto.sagemaker.exceptions import ValidationError
from moto.sagemaker.responses import SageMakerResponse
from moto.sagemakerruntime.responses import SageMakerRuntimeResponse

from flanops.infra.endpoint_client import running_endpoints

from .embedded import OWN_EXECUTOR_TOKEN
from .home import flanops_home, process_alive
from .records import mark_orphaned, pipeline_of, records_dir

# An execution that no executor has recorded within this long after its start never will.
UNRECORDED_GRACE_S = 120
FINISHED = ("Succeeded", "Failed", "Stopped", "CompletedWithFailures")


def parse_time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def aware(moment: datetime) -> datetime:
    """moto keeps UTC times without a zone."""
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def last_line(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(an empty log)"


class Executions:
    """The records of this home's executions and the executors this server started, by ARN."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.children: dict[str, tuple[subprocess.Popen, Path]] = {}   # ARN → (executor process, its log)
        self.stopping: set[str] = set()
        self.lock = threading.Lock()

    def record(self, arn: str) -> dict | None:
        path = records_dir(self.home, pipeline_of(arn)) / f"{arn.rsplit('/', 1)[-1]}.json"
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        mark_orphaned(record)
        return record

    def status(self, arn: str, started: datetime) -> tuple[str, str | None, dict | None]:
        """(status, failure reason, record) of an execution as its executor tells, or as far as it can be known."""
        record = self.record(arn)
        child = self.children.get(arn)
        if child and (record is None or record.get("ExecutorPid") != child[0].pid):
            # the executor launched here (a start or a retry) has not taken the record over yet
            if child[0].poll() is None:
                status, reason = "Executing", None
            else:
                status, reason = "Failed", f"the local executor ended before it ran the execution: " \
                                           f"{last_line(child[1])} (log: {child[1]})"
        elif record is not None:
            status, reason = record["PipelineExecutionStatus"], record.get("FailureReason")
        elif time.time() - aware(started).timestamp() < UNRECORDED_GRACE_S:
            status, reason = "Executing", None   # flanops run writes its record as soon as its executor starts
        else:
            status, reason = "Failed", "no local executor recorded this execution (its process ended early)"
        if status == "Executing" and arn in self.stopping:
            status = "Stopping"
        return status, reason, record

    def launch(self, action: str, arn: str, *options: str) -> None:
        """A detached local executor for ``arn`` (execution_process.py) in its run folder, its output in ``<id>.log``."""
        execution_id = arn.rsplit("/", 1)[-1]
        run_dir = self.home / "runs" / pipeline_of(arn) / execution_id
        run_dir.mkdir(parents=True, exist_ok=True)
        log_path = run_dir.with_name(f"{execution_id}.log")   # beside the run folder: a refusal leaves it alone
        with open(log_path, "ab") as log:
            process = subprocess.Popen([sys.executable, "-m", "flanops.pipelines.execution_process", action, arn,
                                        *options], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       cwd=run_dir, start_new_session=True)
        with self.lock:
            self.children[arn] = (process, log_path)
            self.stopping.discard(arn)


EXECUTIONS: Executions | None = None


def executions() -> Executions:
    if EXECUTIONS is None:
        raise RuntimeError("embedded_api.install() was not called in this process")
    return EXECUTIONS


@functools.cache
def step_shape_members() -> tuple[set[str], set[str]]:
    """The fields of botocore's PipelineExecutionStep and its Metadata: what a step entry may carry."""
    model = botocore.session.get_session().get_service_model("sagemaker")
    return (set(model.shape_for("PipelineExecutionStep").members),
            set(model.shape_for("PipelineExecutionStepMetadata").members))


# ----------------------------------------------------------------------------- the SageMaker API
original_start = SageMakerResponse.start_pipeline_execution


def start_pipeline_execution(self: SageMakerResponse) -> ActionResult:
    result = original_start(self)
    arn = result.result["PipelineExecutionArn"]
    if not str(self._get_param("ClientRequestToken") or "").startswith(OWN_EXECUTOR_TOKEN):
        selective = self._get_param("SelectiveExecutionConfig")
        executions().launch("start", arn, *(["--selective", json.dumps(selective)] if selective else []))
    return result


def describe_pipeline_execution(self: SageMakerResponse) -> ActionResult:
    arn = self._get_param("PipelineExecutionArn")
    response = self.sagemaker_backend.describe_pipeline_execution(arn)
    status, reason, record = executions().status(arn, response["CreationTime"])
    response.update(PipelineExecutionStatus=status, FailureReason=reason or "")
    if record:
        response["LastModifiedTime"] = parse_time(record.get("LastModifiedTime")) or response["LastModifiedTime"]
        if record.get("SelectiveExecutionConfig"):
            response["SelectiveExecutionConfig"] = record["SelectiveExecutionConfig"]
    if not reason:
        response.pop("FailureReason")
    return ActionResult(response)


def list_pipeline_executions(self: SageMakerResponse) -> ActionResult:
    summaries = self.sagemaker_backend.list_pipeline_executions(self._get_param("PipelineName"))
    rows = []
    for summary in summaries["PipelineExecutionSummaries"]:
        status, reason, _ = executions().status(summary["PipelineExecutionArn"], summary["StartTime"])
        summary.update(PipelineExecutionStatus=status)
        summary.pop("PipelineExecutionFailureReason", None)   # moto's text is "None" when there is none
        if reason:
            summary["PipelineExecutionFailureReason"] = reason
        rows.append(summary)
    rows.sort(key=lambda s: aware(s["StartTime"]), reverse=self._get_param("SortOrder", "Descending") != "Ascending")
    return ActionResult({"PipelineExecutionSummaries": rows})


def list_pipeline_execution_steps(self: SageMakerResponse) -> ActionResult:
    arn = self._get_param("PipelineExecutionArn")
    self.sagemaker_backend.describe_pipeline_execution(arn)   # ResourceNotFound for an unknown execution
    record = executions().record(arn) or {"Steps": []}
    step_fields, metadata_fields = step_shape_members()
    steps = []
    for entry in record["Steps"]:
        step = {key: value for key, value in entry.items() if key in step_fields and value not in (None, {})}
        step["StartTime"] = parse_time(entry.get("StartTime"))
        step["EndTime"] = parse_time(entry.get("EndTime"))
        step["Metadata"] = {k: v for k, v in entry.get("Metadata", {}).items() if k in metadata_fields}
        steps.append({key: value for key, value in step.items() if value is not None})
    if self._get_param("SortOrder", "Descending") != "Ascending":
        steps.reverse()   # the record lists steps as they started; SageMaker lists the latest first
    return ActionResult({"PipelineExecutionSteps": steps})


def stop_pipeline_execution(self: SageMakerResponse) -> ActionResult:
    arn = self._get_param("PipelineExecutionArn")
    response = self.sagemaker_backend.describe_pipeline_execution(arn)
    status, _, record = executions().status(arn, response["CreationTime"])
    if status in FINISHED:
        raise ValidationError(f"Pipeline execution {arn} is {status}; only an Executing execution can be stopped")
    child = executions().children.get(arn)
    pid = (record or {}).get("ExecutorPid") or (child[0].pid if child else None)
    if not pid or not process_alive(int(pid)):
        raise ValidationError(f"Pipeline execution {arn} has no running local executor to stop")
    with executions().lock:
        executions().stopping.add(arn)
    os.kill(int(pid), signal.SIGTERM)   # the executor stops its job and records Stopped
    return ActionResult({"PipelineExecutionArn": arn})


def retry_pipeline_execution(self: SageMakerResponse) -> ActionResult:
    arn = self._get_param("PipelineExecutionArn")
    response = self.sagemaker_backend.describe_pipeline_execution(arn)
    status, _, record = executions().status(arn, response["CreationTime"])
    if status != "Failed" or record is None:
        raise ValidationError(f"Pipeline execution {arn} is {status}; only a Failed execution can be retried")
    if record.get("Resumable") is False:
        raise ValidationError(f"Pipeline execution {arn} cannot be retried: {record.get('FailureReason')}")
    executions().launch("retry", arn)
    return ActionResult({"PipelineExecutionArn": arn})


# ----------------------------------------------------------------------------- the SageMaker Runtime API
def reply(status: int, headers: dict[str, str], body: str | bytes) -> tuple[int, dict, str | bytes]:
    """A response as moto's dispatcher takes it: the status travels in the headers."""
    return status, {**headers, "status": str(status)}, body


def invoke_endpoint(self: SageMakerRuntimeResponse):
    """Forward to the local endpoint serving this name, as SageMaker Runtime forwards to the container."""
    name = self._get_param("EndpointName")
    served = running_endpoints()
    if name not in served:
        known = ", ".join(served) or "none"
        message = (f"Endpoint {name} is not being served on this machine (embedded AWS runs no containers); "
                   f"serve it with `flanops serve --stage <stage>` (served now: {known})")
        return reply(400, {"Content-Type": "application/json", "x-amzn-ErrorType": "ValidationError"},
                     json.dumps({"message": message}))
    headers = {key: value for key, value in self.headers.items()
               if key.lower() in ("content-type", "accept") or key.lower().startswith("x-amzn-sagemaker")}
    request = urllib.request.Request(f"{served[name]['url']}/endpoints/{name}/invocations", data=self.raw_body,
                                     headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=300) as answer:   # nosec B310 # a loopback URL we announced
            status, answer_headers, body = answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as err:
        status, answer_headers, body = err.code, err.headers, err.read()
    except OSError as err:
        message = f"the local endpoint {name} at {served[name]['url']} did not answer ({err})"
        return reply(503, {"Content-Type": "application/json", "x-amzn-ErrorType": "ServiceUnavailable"},
                     json.dumps({"message": message}))
    forwarded = {key: value for key, value in answer_headers.items()
                 if key.lower() == "content-type" or key.lower().startswith("x-amzn-")}
    return reply(status, forwarded, body)


def install(home: Path | None = None) -> None:
    """Answer the calls above from the executors' records (in this process: the embedded server)."""
    global EXECUTIONS
    EXECUTIONS = Executions(home or flanops_home())
    for function in (start_pipeline_execution, describe_pipeline_execution, list_pipeline_executions,
                     list_pipeline_execution_steps, stop_pipeline_execution, retry_pipeline_execution):
        setattr(SageMakerResponse, function.__name__, function)
    SageMakerRuntimeResponse.invoke_endpoint = invoke_endpoint
    SageMakerRuntimeResponse.use_raw_body = True   # a payload is bytes (an image, a tensor), not always UTF-8

