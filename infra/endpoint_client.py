"""Reaching a local endpoint from another process: the endpoints being served on this machine (their records
in ``$FLANOPS_HOME/endpoints``), ``flanops serve`` in a process of its own, a SageMaker Runtime client for
it, and summaries through the Runtime API (the same call reaches a SageMaker endpoint)."""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flanops.pipelines.errors import FlanopsError
from flanops.pipelines.home import flanops_home, process_alive


def endpoints_dir() -> Path:
    return flanops_home() / "endpoints"


def endpoint_record(name: str, pid: int) -> Path:
    """One announcement per serving process, so that a short-lived server of the same endpoint (the sample
    invocation after ``flanops run``) never removes a long-running ``flanops serve``'s."""
    return endpoints_dir() / f"{name}@{pid}.json"


def running_endpoints() -> dict[str, dict]:
    """Local endpoints being served on this machine, by name; of two servers of one name, the later started
    (records of dead servers are dropped)."""
    found: dict[str, dict] = {}
    for path in sorted(endpoints_dir().glob("*.json")) if endpoints_dir().is_dir() else []:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not process_alive(int(record.get("pid", 0))):
            path.unlink(missing_ok=True)
            continue
        earlier = found.get(record["endpoint_name"])
        if earlier is None or record.get("started", 0) >= earlier.get("started", 0):
            found[record["endpoint_name"]] = record
    return found

@contextlib.contextmanager
def serve_in_subprocess(*serve_arguments: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """``flanops serve ARGS --port 0`` in a process of its own while the block runs; yields its URL.

    For callers that should not load torch themselves (a notebook kernel, the run process).
    """
    command = [sys.executable, "-m", "flanops.pipelines.cli", "serve", *serve_arguments, "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    try:
        for line in process.stdout:
            lines.append(line)
            if "is serving at " in line:
                # keep reading its output so a full pipe never blocks the server
                threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
                yield line.split("is serving at ", 1)[1].split()[0]
                return
        raise FlanopsError("flanops serve ended before serving:\n" + "".join(lines[-15:]))
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def runtime_client(endpoint_url: str, region: str):
    """A SageMaker Runtime client for a local endpoint (moto's fake keys: nothing real is ever sent)."""
    import boto3
    from botocore.config import Config

    return boto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing",  # nosec B106 # never sent anywhere
                         region_name=region).client(
        "sagemaker-runtime", endpoint_url=endpoint_url, config=Config(retries={"max_attempts": 1},
                                                                      read_timeout=300))


def summarize_remotely(client, endpoint_name: str, dialogues: list[str], parameters: dict | None = None) -> list[str]:
    """Summaries from an endpoint (local or SageMaker) through the Runtime API; handler errors as FlanopsError."""
    from botocore.exceptions import ClientError

    payload: dict[str, Any] = {"inputs": dialogues if len(dialogues) > 1 else dialogues[0]}
    if parameters:
        payload["parameters"] = parameters
    try:
        response = client.invoke_endpoint(EndpointName=endpoint_name, ContentType="application/json",
                                          Accept="application/json", Body=json.dumps(payload).encode())
    except ClientError as err:
        error = err.response.get("Error", {})
        message = err.response.get("OriginalMessage") or error.get("Message") or str(err)
        raise FlanopsError(f"endpoint {endpoint_name}: {message}") from None
    return [item["generated_text"] for item in json.loads(response["Body"].read())]
