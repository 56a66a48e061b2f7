"""Failures the user can act on, said in one line: a step that failed, AWS that stopped answering, a full disk."""
from __future__ import annotations

from pathlib import Path

from stepkit.errors import first_line, storage_problem

from .errors import FlanopsError


class StepFailed(FlanopsError):
    """A step ended in failure; the message is its FailureReason."""


class AwsUnreachable(StepFailed):
    """AWS stopped answering mid-step. With embedded AWS its state died with the server, so the
    execution cannot be resumed; a new run restores the finished steps from their local copies."""


def connection_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    return BotoConnectionError, HTTPClientError


def aws_unreachable(step: str, err: BaseException, endpoint_url: str | None) -> AwsUnreachable:
    from .home import log_file

    if endpoint_url:   # embedded AWS
        return AwsUnreachable(
            f"{step}: embedded AWS at {endpoint_url} stopped answering ({err}); its buckets, pipelines, model "
            f"packages and stacks went with it (server log: {log_file()}). Run the command again: a new server "
            "starts, and `flanops run` restores the steps that finished from their local copies")
    return AwsUnreachable(f"{step}: lost the connection to AWS ({err}); check the network and credentials, "
                          "then run again (finished steps come from SageMaker's cache)")


def known_failure(where: str, error: BaseException, endpoint_url: str | None,
                  folder: Path | None = None) -> StepFailed | None:
    """A failure the user can act on, in one line: AWS stopped answering, or a disk is full or
    read-only (``folder``: where was being written). None for anything else: a bug keeps its traceback."""
    if isinstance(error, connection_errors()):
        return aws_unreachable(where, error, endpoint_url)
    problem = storage_problem(error)
    if problem:
        place = f" while writing under {folder}" if folder else ""
        return StepFailed(f"{where}: {problem}{place} ({first_line(error)}); free space there or choose another "
                          "folder (--output-dir), then run again")
    return None
