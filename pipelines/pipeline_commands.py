"""The commands that act on the pipeline and its executions: definition, upsert, run (and resume), start,
report, executions, steps, and role (the pipeline's execution role); against embedded AWS (the default)
or AWS (``--aws``)."""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from flanops.infra.pipeline_role import pipeline_role_template
from flanops.infra.template import lint_template, write_template

from .config import PipelineConfig, gate_warnings
from .definition import build_definition
from .endpoint_commands import deploy_and_try
from .embedded import OWN_EXECUTOR_TOKEN
from .errors import FlanopsError
from .failures import known_failure
from .home import flanops_home
from .local import LocalExecutor
from .records import list_executions, load_execution, mark_orphaned
from .report import report_run
from .runfacts import find_record, sagemaker_record
from .summary import summarize_execution
from .targets import LOCAL, Target, TargetChoice, aws_session, aws_target, open_target


def definition_for(config: PipelineConfig, target: Target) -> str:
    return build_definition(config, target.role_arn, target.bucket, target.session)


def upsert_pipeline(config: PipelineConfig, target: Target, definition: str) -> str:
    sagemaker = target.client("sagemaker")
    request = {"PipelineName": config.pipeline_name, "PipelineDefinition": definition, "RoleArn": target.role_arn,
               "PipelineDescription": f"flanops lifecycle ({Path(config.source).name})"}
    if not pipeline_exists(sagemaker, config.pipeline_name):
        return sagemaker.create_pipeline(**request, ClientRequestToken=f"{config.pipeline_name}-{time.time_ns()}"
                                         )["PipelineArn"]
    return sagemaker.update_pipeline(**request)["PipelineArn"]


def pipeline_exists(sagemaker, name: str) -> bool:
    pages = sagemaker.get_paginator("list_pipelines").paginate(PipelineNamePrefix=name)
    return any(summary["PipelineName"] == name for page in pages for summary in page["PipelineSummaries"])


def execution_parameters(config: PipelineConfig) -> list[dict[str, str]]:
    return [{"Name": name, "Value": str(value)} for name, value in config.parameter_values().items()]


# ----------------------------------------------------------------------------- commands
# Each command takes a loaded config (config.load_config) and typed options; cli.py and api.py both call them.
def definition_text(config: PipelineConfig, target: TargetChoice = LOCAL) -> str:
    """The pipeline definition JSON for this config on this target."""
    return definition_for(config, open_target(target, config))


def definition(config: PipelineConfig, target: TargetChoice = LOCAL, out: Path | None = None) -> int:
    text = definition_text(config, target)
    if out:
        out.write_text(text, encoding="utf-8")
        print(f"wrote {out} ({len(text)} bytes, pipeline {config.pipeline_name})")
    else:
        print(text, end="")
    return 0


def upsert(config: PipelineConfig, target: TargetChoice = LOCAL) -> int:
    target = open_target(target, config)
    arn = upsert_pipeline(config, target, definition_for(config, target))
    print(f"upserted {arn}")
    return 0


def run(config: PipelineConfig, target: TargetChoice = LOCAL, output_dir: Path | None = None,
        resume: str | None = None, deploy: bool = True) -> int:
    """Build, upsert and run the pipeline (or ``resume`` a failed execution); locally, deploy what it registers."""
    if not resume:   # a resumed execution keeps its own parameters
        warn_about_gate(config)
    if resume and config.overrides:
        raise FlanopsError("--resume reruns an execution with its own parameters; drop --param")
    if not resume:
        check_run_dir(output_dir)
    target = open_target(target, config)
    if resume and not target.local:
        return retry_on_sagemaker(config, target, resume)
    if resume:
        code, run_dir = resume_local(config.pipeline_name, target, resume)
    else:
        definition_text = definition_for(config, target)
        upsert_pipeline(config, target, definition_text)
        code, run_dir = start_execution(config, target, definition_text, output_dir)
    try:
        if code == 0 and run_dir and deploy:
            code = deploy_and_try(target, run_dir)
    finally:
        if run_dir:
            write_run_report(target, run_dir)
    return code


def start(config: PipelineConfig, target: TargetChoice = LOCAL, output_dir: Path | None = None) -> int:
    warn_about_gate(config)
    target = open_target(target, config)
    sagemaker = target.client("sagemaker")
    if not pipeline_exists(sagemaker, config.pipeline_name):
        raise FlanopsError(f"pipeline {config.pipeline_name!r} does not exist yet; run `flanops upsert` first")
    definition_text = sagemaker.describe_pipeline(PipelineName=config.pipeline_name)["PipelineDefinition"]
    code, run_dir = start_execution(config, target, definition_text, output_dir)
    if run_dir:
        write_run_report(target, run_dir)
    return code


def warn_about_gate(config: PipelineConfig) -> None:
    """Before an execution starts: thresholds no model passes, one line each (the run goes ahead)."""
    for warning in gate_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)


def write_run_report(target: Target, run_dir: Path) -> None:
    """A local run's report.html and report.md."""
    announce_report(lambda: report_run(target.session, find_record(flanops_home(), "", str(run_dir))),
                    f"flanops report {run_dir}")


def announce_report(write: Callable[[], Path], retry: str) -> None:
    """Write a run's report and say where; a run's outcome stands even when its report cannot be written."""
    try:
        path = write()
    except Exception as err:
        failure = err if isinstance(err, FlanopsError) else known_failure("the report", err, None)
        if failure is None:
            raise
        print(f"report: not written ({failure}); try again with `{retry}`")
        return
    print(f"report: {path}  (and report.md beside it)")


def report(config: PipelineConfig, run: str, target: TargetChoice = LOCAL, output_dir: Path | None = None) -> int:
    """Write (again) a run's report: a local run's into its run folder, a SageMaker execution's (aws) to output_dir."""
    if target.aws:   # a SageMaker execution: its record comes from the API, the report goes to a local folder
        session = aws_session()
        arn = execution_arn(session.client("sagemaker"), config.pipeline_name, run)
        path = report_run(session, *sagemaker_record(session, arn, sagemaker_run_dir(output_dir, arn)))
    else:
        record = find_record(flanops_home(), config.pipeline_name, run)
        path = report_run(open_target(target).session, record)
    print(f"report: {path}\nmarkdown: {path.with_name('report.md')}")
    return 0


def start_execution(config: PipelineConfig, target: Target, definition_text: str,
                    output_dir: Path | None) -> tuple[int, Path | None]:
    """Start one execution and follow it to its end: (exit code, local run folder or None on SageMaker)."""
    sagemaker = target.client("sagemaker")
    if not target.local:
        arn = sagemaker.start_pipeline_execution(PipelineName=config.pipeline_name,
                                                 PipelineParameters=execution_parameters(config))["PipelineExecutionArn"]
        print(f"started {arn}")
        code = follow_on_sagemaker(target, arn)
        announce_report(lambda: report_run(target.session, *sagemaker_record(
            target.session, arn, sagemaker_run_dir(output_dir, arn))), f"flanops report --aws {arn}")
        return code, None
    run_dir = prepare_run_dir(output_dir)
    # the token tells embedded AWS that this process runs the execution (embedded_api starts none)
    arn = sagemaker.start_pipeline_execution(PipelineName=config.pipeline_name,
                                             PipelineParameters=execution_parameters(config),
                                             ClientRequestToken=OWN_EXECUTOR_TOKEN + uuid.uuid4().hex,
                                             )["PipelineExecutionArn"]
    print(f"execution {arn}\nrun folder {run_dir}")
    executor = LocalExecutor(target.session, config.pipeline_name, json.loads(definition_text), flanops_home(),
                             run_dir, job_env=target.job_env)
    record = executor.start(config.parameter_values(), arn)
    return summarize_execution(record, run_dir), run_dir


def resume_local(pipeline_name: str, target: Target, execution: str) -> tuple[int, Path]:
    """Rerun a failed or stopped local execution from its failed step (``flanops run --resume``, RetryPipelineExecution)."""
    record = load_execution(flanops_home(), pipeline_name, execution)
    mark_orphaned(record)
    if record["PipelineExecutionStatus"] == "Succeeded":
        raise FlanopsError(f"execution {record['ExecutionId']} succeeded; there is nothing to resume")
    if record["PipelineExecutionStatus"] == "Executing":
        raise FlanopsError(f"execution {record['ExecutionId']} is still running (pid {record.get('ExecutorPid')})")
    if record.get("Resumable") is False:
        raise FlanopsError(f"execution {record['ExecutionId']} cannot be resumed: {record['FailureReason']}")
    run_dir = Path(record["RunDir"])
    definition_text = (run_dir / "definition.json").read_text(encoding="utf-8")
    print(f"resuming {record['PipelineExecutionArn']}\nrun folder {run_dir}")
    executor = LocalExecutor(target.session, pipeline_name, json.loads(definition_text), flanops_home(),
                             run_dir, job_env=target.job_env)
    return summarize_execution(executor.resume(record), run_dir), run_dir


def sagemaker_run_dir(output_dir: Path | None, arn: str) -> Path:
    """Where a SageMaker execution's report goes on this machine: --output-dir or runs/<execution id>."""
    return (output_dir or Path("runs") / arn.rsplit("/", 1)[-1]).absolute()


def check_run_dir(output_dir: Path | None) -> None:
    if output_dir is not None and output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FlanopsError(f"--output-dir {output_dir} is not an empty folder; choose another (nothing was changed)")
    folder = (output_dir or Path("runs")).absolute()
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    if not os.access(existing, os.W_OK):   # before hours of work, not after
        raise FlanopsError(f"{'--output-dir ' + str(output_dir) if output_dir else 'runs/ in ' + str(Path.cwd())}: "
                           f"{existing} is not writable (read-only file system or no permission); choose another "
                           "folder with --output-dir")


def prepare_run_dir(output_dir: Path | None) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir = (output_dir or Path("runs") / stamp).absolute()
    check_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def executions(config: PipelineConfig, target: TargetChoice = LOCAL) -> int:
    if not target.aws:   # the local records are files: no need to start embedded AWS to read them
        rows = [(r["ExecutionId"], r["PipelineExecutionStatus"], r["CreationTime"], r.get("FailureReason") or "")
                for r in list_executions(flanops_home(), config.pipeline_name)]
    else:
        summaries = aws_target(target).client("sagemaker").list_pipeline_executions(PipelineName=config.pipeline_name)
        rows = [(s["PipelineExecutionArn"].rsplit("/", 1)[-1], s["PipelineExecutionStatus"], str(s["StartTime"]),
                 s.get("PipelineExecutionFailureReason") or "") for s in summaries["PipelineExecutionSummaries"]]
    if not rows:
        print(f"no executions of {config.pipeline_name} yet")
        return 0
    print(f"{'execution':<14}{'status':<11}{'started':<27}failure")
    for row in rows:
        print(f"{row[0]:<14}{row[1]:<11}{row[2]:<27}{row[3]}")
    return 0


def steps(config: PipelineConfig, execution: str, target: TargetChoice = LOCAL) -> int:
    if not target.aws:
        entries = load_execution(flanops_home(), config.pipeline_name, execution)["Steps"]
    else:
        opened = aws_target(target)
        arn = execution_arn(opened.client("sagemaker"), config.pipeline_name, execution)
        entries = opened.client("sagemaker").list_pipeline_execution_steps(PipelineExecutionArn=arn,
                                                                           SortOrder="Ascending")["PipelineExecutionSteps"]
    print(f"{'step':<18}{'status':<11}{'start':<27}{'end':<27}{'cached':<8}failure")
    for s in entries:
        print(f"{s['StepName']:<18}{s['StepStatus']:<11}{str(s.get('StartTime') or ''):<27}"
              f"{str(s.get('EndTime') or ''):<27}{'yes' if s.get('CacheHitResult') else '':<8}{s.get('FailureReason') or ''}")
    return 0


def execution_arn(sagemaker, pipeline_name: str, execution: str) -> str:
    """The ARN of an execution given by id or ARN."""
    if execution.startswith("arn:"):
        return execution
    pages = sagemaker.get_paginator("list_pipeline_executions").paginate(PipelineName=pipeline_name)
    for summary in (s for page in pages for s in page["PipelineExecutionSummaries"]):
        if summary["PipelineExecutionArn"].endswith(f"/{execution}"):
            return summary["PipelineExecutionArn"]
    raise FlanopsError(f"no execution {execution!r} of {pipeline_name}; see `flanops executions --aws`")


def follow_on_sagemaker(target: Target, arn: str, poll_seconds: int = 30) -> int:
    """Print each step's status changes until the execution ends."""
    sagemaker = target.client("sagemaker")
    seen: dict[str, str] = {}
    while True:
        for step in sagemaker.list_pipeline_execution_steps(PipelineExecutionArn=arn,
                                                            SortOrder="Ascending")["PipelineExecutionSteps"]:
            if seen.get(step["StepName"]) != step["StepStatus"]:
                seen[step["StepName"]] = step["StepStatus"]
                print(f"{step['StepName']:<18}{step['StepStatus']:<11}{step.get('FailureReason') or ''}")
        status = sagemaker.describe_pipeline_execution(PipelineExecutionArn=arn)
        if status["PipelineExecutionStatus"] not in ("Executing", "Stopping"):
            print(f"execution {arn}: {status['PipelineExecutionStatus']} {status.get('FailureReason') or ''}")
            return 0 if status["PipelineExecutionStatus"] == "Succeeded" else 1
        time.sleep(poll_seconds)


def retry_on_sagemaker(config: PipelineConfig, target: Target, execution: str) -> int:
    arn = execution_arn(target.client("sagemaker"), config.pipeline_name, execution)
    target.client("sagemaker").retry_pipeline_execution(PipelineExecutionArn=arn)
    print(f"retrying {arn}")
    return follow_on_sagemaker(target, arn)


def role(config: PipelineConfig, out: Path = Path("pipeline-role.json"), bucket: str | None = None,
         region: str | None = None) -> int:
    """Write the pipeline execution role (least privilege) as a CloudFormation template, cfn-lint checked."""
    import boto3

    region = region or boto3.Session().region_name
    if not region:
        raise FlanopsError("flanops role: no AWS region; pass --region (the jobs' images differ per region)")
    template = pipeline_role_template(config, region=region, bucket=bucket)
    path = write_template(template, out)
    findings = lint_template(template, regions=[region])
    print(f"wrote {path}: the execution role of pipeline {config.pipeline_name} in {region}, bucket "
          f"{bucket or 'sagemaker-<region>-<account>'}; cfn-lint: "
          f"{'clean' if not findings else f'{len(findings)} finding(s)'}")
    for finding in findings:
        print(f"  {finding}")
    print(f"deploy it: aws cloudformation deploy --template-file {path} --stack-name {config.pipeline_name}-role "
          "--capabilities CAPABILITY_IAM\nthen: flanops run --aws --role <the stack's RoleArn output>")
    return 1 if any(finding.startswith("E") for finding in findings) else 0


