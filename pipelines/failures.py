"""Failures the user can act on, said in one line: a step that failed, AWS that stopped answering, a full disk."""
from __future__ import annotations

from pathlib import Path

from stepkit.errors import first_line, storage_problem

from .errors import FlanopsError


# The exception types of a step's RetryPolicies (sagemaker's StepExceptionTypeEnum and
# SageMakerJobExceptionTypeEnum) that a local failure can be; README's local executor section says which is which.
JOB_INTERNAL_ERROR = "SageMaker.JOB_INTERNAL_ERROR"
RESOURCE_LIMIT = "SageMaker.RESOURCE_LIMIT"
SERVICE_FAULT = "Step.SERVICE_FAULT"
THROTTLING = "Step.THROTTLING"
THROTTLING_CODES = {"Throttling", "ThrottlingException", "ThrottledException", "RequestLimitExceeded",
                    "TooManyRequestsException", "SlowDown", "RequestThrottled", "ProvisionedThroughputExceededException"}


class StepFailed(FlanopsError):
    """A step ended in failure; the message is its FailureReason. ``exception_type`` is the retry policies'
    name for it (``SageMaker.JOB_INTERNAL_ERROR``…), None for a failure no policy retries (a script's own error)."""

    def __init__(self, message: str, exception_type: str | None = None):
        super().__init__(message)
        self.exception_type = exception_type


class AwsUnreachable(StepFailed):
    """AWS stopped answering mid-step. With embedded AWS its state died with the server, so the
    execution cannot be resumed; a new run restores the finished steps from their local copies."""


class DefinitionRefused(FlanopsError):
    """A definition the local executor cannot run, refused before any job starts: the step, the construct,
    and what to do, in one line."""


def connection_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    return BotoConnectionError, HTTPClientError


def aws_unreachable(step: str, err: BaseException, endpoint_url: str | None) -> AwsUnreachable:
    from .home import log_file

    if endpoint_url:   # embedded AWS: its state died with it, so no retry can help (no exception type)
        return AwsUnreachable(
            f"{step}: embedded AWS at {endpoint_url} stopped answering ({err}); its buckets, pipelines, model "
            f"packages and stacks went with it (server log: {log_file()}). Run the command again: a new server "
            "starts, and `flanops run` restores the steps that finished from their local copies")
    return AwsUnreachable(f"{step}: lost the connection to AWS ({err}); check the network and credentials, "
                          "then run again (finished steps come from SageMaker's cache)", SERVICE_FAULT)


def known_failure(where: str, error: BaseException, endpoint_url: str | None,
                  folder: Path | None = None) -> StepFailed | None:
    """A failure the user can act on, in one line: AWS stopped answering or throttled, a quota, or a disk is full or
    read-only (``folder``: where was being written). None for anything else: a bug keeps its traceback."""
    if isinstance(error, connection_errors()):
        return aws_unreachable(where, error, endpoint_url)
    response = getattr(error, "response", None)   # a botocore ClientError's
    code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
    if code in THROTTLING_CODES:
        return StepFailed(f"{where}: AWS throttled the request ({first_line(error)}); run again later", THROTTLING)
    if code == "ResourceLimitExceeded":
        return StepFailed(f"{where}: {first_line(error)}; free the resource or raise the quota", RESOURCE_LIMIT)
    problem = storage_problem(error)
    if problem:
        place = f" while writing under {folder}" if folder else ""
        return StepFailed(f"{where}: {problem}{place} ({first_line(error)}); free space there or choose another "
                          "folder (--output-dir), then run again")
    return None
