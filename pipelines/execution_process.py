"""The local executor of an execution that the SageMaker API started or retried on embedded AWS.

``pipeline.start()`` in a notebook, ``aws sagemaker start-pipeline-execution`` or boto3 reach
embedded AWS, which (embedded_api.py) launches this detached, in the execution's run folder
(``<flanops home>/runs/<pipeline>/<execution id>``); ``flanops run`` runs its executor itself.

    python -m flanops.pipelines.execution_process start ARN [--selective JSON]
    python -m flanops.pipelines.execution_process retry ARN
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .errors import FlanopsError
from .home import flanops_home
from .local import LocalExecutor
from .records import pipeline_of
from .pipeline_commands import resume_local, write_run_report
from .summary import summarize_execution
from .targets import LOCAL, open_target


def typed_parameters(definition: dict, given: list[dict[str, str]]) -> dict[str, Any]:
    """The API's parameter texts as the definition's types (Integer, Float, Boolean, String); a name the
    definition does not have stays text, for the executor's validation to refuse in its one line."""
    types = {p["Name"]: p.get("Type", "String") for p in definition.get("Parameters", [])}
    convert = {"Integer": int, "Float": float, "Boolean": lambda text: str(text).lower() == "true"}
    typed = {}
    for parameter in given:
        kind = types.get(parameter["Name"], "String")
        try:
            typed[parameter["Name"]] = convert.get(kind, str)(parameter["Value"])
        except ValueError:
            raise FlanopsError(f"parameter {parameter['Name']}: {parameter['Value']!r} is not {kind}") from None
    return typed


def start(arn: str, selective: dict | None) -> int:
    target = open_target(LOCAL)
    sagemaker = target.client("sagemaker")
    definition = json.loads(sagemaker.describe_pipeline_definition_for_execution(
        PipelineExecutionArn=arn)["PipelineDefinition"])
    parameters = typed_parameters(definition, sagemaker.list_pipeline_parameters_for_execution(
        PipelineExecutionArn=arn).get("PipelineParameters") or [])   # moto leaves the key out when none were given
    pipeline_name = pipeline_of(arn)
    run_dir = Path.cwd()
    print(f"execution {arn}\nrun folder {run_dir}", flush=True)
    executor = LocalExecutor(target.session, pipeline_name, definition, flanops_home(), run_dir,
                             job_env=target.job_env)
    record = executor.start(parameters, arn, selective=selective)
    code = summarize_execution(record, run_dir)
    write_run_report(target, run_dir)
    return code


def retry(arn: str) -> int:
    target = open_target(LOCAL)
    pipeline_name = pipeline_of(arn)
    code, run_dir = resume_local(pipeline_name, target, arn)
    write_run_report(target, run_dir)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flanops.pipelines.execution_process", allow_abbrev=False,
                                     description="internal: run an execution started through embedded AWS's API")
    parser.add_argument("action", choices=("start", "retry"))
    parser.add_argument("arn")
    parser.add_argument("--selective", type=json.loads, default=None, help="SelectiveExecutionConfig (JSON)")
    args = parser.parse_args(argv)
    try:
        return start(args.arn, args.selective) if args.action == "start" else retry(args.arn)
    except FlanopsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
