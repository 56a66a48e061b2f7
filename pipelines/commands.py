"""What each ``flanops`` command does, against embedded AWS (default) or AWS (``--aws``)."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .config import PipelineConfig, gate_warnings
from .definition import quiet_sdk
from .errors import FlanopsError

ROLE_NAME = "flanops-pipeline-execution"   # created in embedded AWS only


@dataclass(frozen=True)
class TargetChoice:
    """Where a command works: embedded AWS on this machine (default) or, with ``aws``, your account."""

    aws: bool = False
    role: str | None = None      # aws: the pipeline's execution role (default: $FLANOPS_ROLE_ARN or Studio's)
    bucket: str | None = None    # aws: the S3 bucket (default: the SageMaker session's default bucket)


LOCAL = TargetChoice()


@dataclass
class Target:
    session: Any            # boto3 Session on the target AWS
    role_arn: str
    bucket: str
    local: bool
    job_env: dict[str, str]

    def client(self, name: str):
        return self.session.client(name)


def open_target(choice: TargetChoice, config: PipelineConfig | None = None) -> Target:
    """Embedded AWS or AWS. With ``config``, a bucket created here gets its KMS key, and embedded AWS's
    role gets the pipeline's least-privilege policy (``flanops role`` writes the same one for AWS)."""
    kms_key_id = config.security.kms_key_id if config else None
    if choice.aws:
        return aws_target(choice, kms_key_id)
    from .embedded import ensure_server
    from flanops.infra.pipeline_role import SAGEMAKER_TRUST, put_pipeline_policy

    aws = ensure_server()
    aws.activate()   # the SDK makes its own clients from the environment: point them at the server too
    session = aws.boto_session()
    iam = session.client("iam")
    try:
        role_arn = iam.get_role(RoleName=ROLE_NAME)["Role"]["Arn"]
    except iam.exceptions.NoSuchEntityException:
        role_arn = iam.create_role(RoleName=ROLE_NAME, AssumeRolePolicyDocument=json.dumps(SAGEMAKER_TRUST))["Role"]["Arn"]
    quiet_sdk()
    bucket = embedded_bucket(session, kms_key_id)
    if config is not None:
        put_pipeline_policy(session, role_arn, config, bucket=bucket)
    return Target(session, role_arn, bucket, True, aws.environment())


def aws_session():
    import boto3

    session = boto3.Session()
    if not session.region_name:
        raise FlanopsError("--aws: no AWS region configured; set AWS_DEFAULT_REGION or a profile with a region")
    if session.get_credentials() is None:
        raise FlanopsError("--aws: no AWS credentials found; configure a profile (aws configure) or run in Studio")
    return session


def aws_target(choice: TargetChoice, kms_key_id: str | None = None) -> Target:
    session = aws_session()
    role_arn = choice.role or os.environ.get("FLANOPS_ROLE_ARN")
    quiet_sdk()
    if not role_arn:
        try:
            from sagemaker.core.helper.session_helper import get_execution_role

            role_arn = get_execution_role()
        except Exception:
            raise FlanopsError("--aws: no execution role; pass --role ARN or set FLANOPS_ROLE_ARN (outside "
                               "SageMaker Studio the role cannot be discovered)") from None
    return Target(session, role_arn, choice.bucket or default_bucket(session, kms_key_id), False, {})


def embedded_bucket(session, kms_key_id: str | None = None) -> str:
    """The SDK's default bucket name (sagemaker-<region>-<account>), in embedded S3; created locked down if missing.

    The SDK's own default_bucket() calls STS at its public regional endpoint, bypassing ours.
    """
    from flanops.infra.buckets import ensure_bucket

    bucket, _ = sdk_default_bucket(session)
    ensure_bucket(session.client("s3"), bucket, session.region_name, kms_key_id=kms_key_id)
    return bucket


def sdk_default_bucket(session) -> tuple[str, str]:
    """(sagemaker-<region>-<account>, account): the SDK's default bucket name and the account that should own it."""
    account = session.client("sts").get_caller_identity()["Account"]
    return f"sagemaker-{session.region_name}-{account}", account


def default_bucket(session, kms_key_id: str | None = None) -> str:
    """The SageMaker SDK's default bucket (sagemaker-<region>-<account>).

    Created here, locked down, when missing (the SDK would create a bare one); an existing
    bucket is left as it is. The SDK then checks that this account owns it.
    """
    from sagemaker.core.workflow.pipeline_context import PipelineSession

    from flanops.infra.buckets import ensure_bucket

    bucket, account = sdk_default_bucket(session)
    ensure_bucket(session.client("s3"), bucket, session.region_name, kms_key_id=kms_key_id, expected_owner=account)
    return PipelineSession(boto_session=session).default_bucket()


def definition_for(config: PipelineConfig, target: Target) -> str:
    from .definition import build_definition

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
        code, run_dir = resume_local(config, target, resume)
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
    from .home import flanops_home
    from .report import report_run
    from .runfacts import find_record

    announce_report(lambda: report_run(target.session, find_record(flanops_home(), "", str(run_dir))),
                    f"flanops report {run_dir}")


def announce_report(write: Callable[[], Path], retry: str) -> None:
    """Write a run's report and say where; a run's outcome stands even when its report cannot be written."""
    from .failures import known_failure

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
    from .home import flanops_home
    from .report import report_run
    from .runfacts import find_record

    if target.aws:   # a SageMaker execution: its record comes from the API, the report goes to a local folder
        from .runfacts import sagemaker_record

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
        from .report import report_run
        from .runfacts import sagemaker_record

        announce_report(lambda: report_run(target.session, *sagemaker_record(
            target.session, arn, sagemaker_run_dir(output_dir, arn))), f"flanops report --aws {arn}")
        return code, None
    from .home import flanops_home
    from .local import LocalExecutor

    run_dir = prepare_run_dir(output_dir)
    arn = sagemaker.start_pipeline_execution(PipelineName=config.pipeline_name,
                                             PipelineParameters=execution_parameters(config))["PipelineExecutionArn"]
    print(f"execution {arn}\nrun folder {run_dir}")
    executor = LocalExecutor(target.session, config.pipeline_name, json.loads(definition_text), flanops_home(),
                             run_dir, job_env=target.job_env)
    record = executor.start(config.parameter_values(), arn)
    return summarize_execution(record, run_dir), run_dir


def resume_local(config: PipelineConfig, target: Target, execution: str) -> tuple[int, Path]:
    from .home import flanops_home
    from .local import LocalExecutor
    from .records import load_execution, mark_orphaned

    record = load_execution(flanops_home(), config.pipeline_name, execution)
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
    executor = LocalExecutor(target.session, config.pipeline_name, json.loads(definition_text), flanops_home(),
                             run_dir, job_env=target.job_env)
    return summarize_execution(executor.resume(record), run_dir), run_dir


# The sample invocation after a local run: a dialogue written by hand, not by the data generator, and the
# facts a summary of it must state.
SAMPLE = {"dialogue": "#Person1#: Hi, I'd like to book a table for four at 7 pm on Friday.\n"
                      "#Person2#: Sure, under what name?\n#Person1#: Johnson.",
          "facts": {"speakers": ["Johnson"], "count": "four", "time": "7 pm", "day": "Friday"}}


def deploy_and_try(target: Target, run_dir: Path, stage_name: str = "staging") -> int:
    """After a local run: deploy the registered package to the local stage's stack and invoke it once."""
    from flanops.infra.deploy import deploy as deploy_stack
    from flanops.infra.deploy import resolve_package
    from flanops.infra.stages import load_stage
    from .files import write_json_atomic
    from stepkit.metrics import stated_facts

    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    arn = summary.get("model_package_arn")
    if not arn:
        return 0
    stage = load_stage(stage_name)
    print(f"\ndeploying {arn} to the local {stage.name} stage (CloudFormation on embedded AWS)")
    try:
        package = resolve_package(target.session, model_package_arn=arn, stage=stage)
        result = deploy_stack(target.session, stage, package, default_bucket=target.bucket)
        dialogue = SAMPLE["dialogue"]
        generated = sample_invocation(arn, result.endpoint_name, target.session.region_name, dialogue)
    except FlanopsError as err:
        raise FlanopsError(f"the pipeline succeeded and registered {arn}, but deploying it to {stage.name} "
                           f"failed: {err}") from None
    print(f"\nsample invocation of endpoint {result.endpoint_name} (through model.tar.gz's code/inference.py):")
    print("  dialogue: " + dialogue.replace("\n", "\n            "))
    print(f"  summary:  {generated}")
    stated = {value: said for values in stated_facts(generated, SAMPLE["facts"]).values() for value, said in values}
    print("  facts:    " + ", ".join(f"{value} {'stated' if said else 'MISSING'}" for value, said in stated.items()))
    print(f"\nnext: flanops serve --stage {stage.name}   (then flanops invoke \"...\" or boto3 invoke_endpoint)\n"
          f"      flanops approve {arn} && flanops deploy --stage prod --latest-approved --dry-run")
    summary["deployment"] = {"stage": stage.name, "stack": result.stack_name, "endpoint_name": result.endpoint_name,
                             "model_package_arn": arn, "sample": {"dialogue": dialogue, "summary": generated, "facts_stated": stated}}
    write_json_atomic(summary_file, summary)
    return 0


def sample_invocation(package_arn: str, endpoint_name: str, region: str, dialogue: str) -> str:
    """One request through the Runtime API to the endpoint as ``flanops serve`` runs it, in its own process.

    A process of its own also keeps torch out of the run's process, whose mix of native libraries
    (pyarrow, scipy, torch) sometimes aborted at exit after serving from a thread.
    """
    from flanops.infra.serving import runtime_client, serve_in_subprocess, summarize_remotely

    with serve_in_subprocess("--model-package", package_arn, "--endpoint-name", endpoint_name) as url:
        return summarize_remotely(runtime_client(url, region), endpoint_name, [dialogue])[0]


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


# ----------------------------------------------------------------------------- reporting
def gate_sentence(gate: dict) -> str:
    """``ROUGE-L 0.64 (min 0.4), p95 latency 12.3 ms (max 1000), …``: every condition, measured and its threshold
    (or why it was skipped)."""
    return ", ".join(f"{c['label']} {c['skipped']}" if c.get("skipped") else
                     f"{c['label']} {fmt(c['measured'])}{c['unit']} ({c['bound']} {c['threshold']})"
                     + ("" if c["passed"] is not False else " FAILED") for c in gate["conditions"])


def summarize_execution(record: dict, run_dir: Path) -> int:
    from .definition import NAMES
    from .runfacts import gate_facts
    from .tables import GATE

    print()
    print(f"{'step':<18}{'status':<11}{'seconds':>9}  cached")
    print("-" * 46)
    for step in record["Steps"]:
        cached = "yes" if step.get("CacheHitResult") else ""
        print(f"{step['StepName']:<18}{step['StepStatus']:<11}{step.get('DurationSeconds') or 0:>9.1f}  {cached}")
    total = sum(step.get("DurationSeconds") or 0 for step in record["Steps"])
    print(f"{'total':<29}{total:>9.1f}")
    gate = gate_facts(record)
    if gate:
        verdict = {True: "PASSED", False: "FAILED", None: "not reached"}[gate["passed"]]
        print(f"\nquality gate {verdict} for variant {gate['variant']}: {gate_sentence(gate)}")
        if gate["why"]:
            print(f"variant choice: {gate['why']}")
        for row in gate["candidates"] or []:
            figures = ", ".join(f"{c['label']} {fmt(row[c['metric']])}{c['unit']}" for c in gate["candidate_columns"]
                                if row.get(c["metric"]) is not None)
            print(f"  {row['name']:<10} {figures}  {row.get('why', '')}")
    registered = next((s["Metadata"]["RegisterModel"]["Arn"] for s in record["Steps"]
                       if s["StepName"] == NAMES.register and s["StepStatus"] == "Succeeded"), None)
    if registered:
        print(f"registered model package: {registered}")
    status = record["PipelineExecutionStatus"]
    print(f"\nexecution {record['ExecutionId']}: {status}"
          + (f" — {record['FailureReason']}" if record.get("FailureReason") else ""))
    gate_failed = any(s["StepType"] == "Fail" for s in record["Steps"])
    if status == "Failed" and gate_failed:
        failed = [c for c in (gate or {}).get("conditions", []) if c["passed"] is False]
        hint = ", ".join(f"--param {c['parameter']}=… ({c['label']} {fmt(c['measured'])}{c['unit']} against "
                         f"{c['bound']} {c['threshold']})" for c in failed) or \
            "one of " + ", ".join(f"--param {c.parameter}=…" for c in GATE)
        print(f"the model did not pass the gate; change the model or the threshold that failed ({hint}) and run "
              "again: unchanged jobs come from the cache")
    elif status in ("Failed", "Stopped") and record.get("Resumable", True):
        print(f"fix the cause, then: flanops run --resume {record['ExecutionId']}")
    summary = {
        "execution_arn": record["PipelineExecutionArn"], "execution_id": record["ExecutionId"], "status": status,
        "failure_reason": record.get("FailureReason"), "run_dir": str(run_dir), "parameters": record["Parameters"],
        "steps": [{"name": s["StepName"], "type": s["StepType"], "status": s["StepStatus"],
                   "seconds": s.get("DurationSeconds"), "cached": bool(s.get("CacheHitResult")),
                   "failure_reason": s.get("FailureReason")} for s in record["Steps"]],
        "gate": gate, "model_package_arn": registered,
    }
    from .files import write_json_atomic

    write_json_atomic(run_dir / "summary.json", summary)
    print(f"summary: {run_dir / 'summary.json'}")
    return 0 if status == "Succeeded" else 1


def fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


def executions(config: PipelineConfig, target: TargetChoice = LOCAL) -> int:
    if not target.aws:   # the local records are files: no need to start embedded AWS to read them
        from .home import flanops_home
        from .records import list_executions

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
        from .home import flanops_home
        from .records import load_execution

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


# ----------------------------------------------------------------------------- approve, deploy, serve
def target_session(target: TargetChoice = LOCAL):
    """The boto3 session of the target, for commands that need no pipeline role: embedded AWS or ``--aws``."""
    if target.aws:
        return aws_session()
    from .embedded import ensure_server

    aws = ensure_server()
    aws.activate()
    return aws.boto_session()


def package_group(config: PipelineConfig) -> str:
    return config.parameter_values()["ModelPackageGroupName"]


def approve(model_package: str, description: str | None = None, target: TargetChoice = LOCAL) -> int:
    from flanops.infra.deploy import approve as approve_package

    package = approve_package(target_session(target), model_package, description)
    print(f"approved {package['ModelPackageArn']} (group {package['ModelPackageGroupName']}, "
          f"version {package.get('ModelPackageVersion')})")
    return 0


def deploy(config: PipelineConfig, stage: str, target: TargetChoice = LOCAL, model_package: str | None = None,
           dry_run: bool = False, lint: bool = True, out: Path | None = None) -> int:
    """Deploy ``model_package`` (default: the group's newest Approved version) to ``stage``'s endpoint stack."""
    from flanops.infra.deploy import deploy as deploy_stack
    from flanops.infra.deploy import dry_run as write_dry_run
    from flanops.infra.deploy import resolve_package
    from flanops.infra.stages import load_stage

    stage = load_stage(stage)
    if out and not dry_run:
        raise FlanopsError("--out goes with --dry-run (a deploy writes no template file)")
    session = target_session(target)
    kms_key_id = config.security.kms_key_id
    bucket = target.bucket or (default_bucket(session, kms_key_id) if target.aws else embedded_bucket(session, kms_key_id))
    package = resolve_package(session, model_package_arn=model_package, latest_approved=not model_package,
                              group=package_group(config), stage=stage)
    if dry_run:
        write_dry_run(stage, package, default_bucket=bucket, out=out or Path(f"{stage.name}-template.json"))
        return 0
    result = deploy_stack(session, stage, package, default_bucket=bucket, lint=lint)
    if not target.aws:
        print(f"embedded AWS runs no containers; serve this endpoint here with: flanops serve --stage {stage.name}")
    return 0 if result.endpoint_name else 1


def role(config: PipelineConfig, out: Path = Path("pipeline-role.json"), bucket: str | None = None,
         region: str | None = None) -> int:
    """Write the pipeline execution role (least privilege) as a CloudFormation template, cfn-lint checked."""
    import boto3

    from flanops.infra.pipeline_role import pipeline_role_template
    from flanops.infra.template import lint_template, write_template

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


def destroy(config: PipelineConfig, stage: str, target: TargetChoice = LOCAL) -> int:
    from flanops.infra.deploy import destroy as destroy_stack

    destroy_stack(target_session(target), stage, package_group(config))
    return 0


def serve(config: PipelineConfig, target: TargetChoice = LOCAL, stage: str | None = None,
          model_package: str | None = None, model_data: str | None = None, endpoint_name: str | None = None,
          host: str = "127.0.0.1", port: int = 8080) -> int:
    """Serve one model here as a SageMaker endpoint: ``stage``'s (default staging), a package's or a model.tar.gz."""
    import signal
    import threading

    from flanops.infra.serving import DataCapture, serving

    session = target_session(target)
    source, endpoint_name, package_arn = model_to_serve(session, package_group(config), stage, model_package,
                                                        model_data, endpoint_name)
    record = {"model_data": str(source), "model_package_arn": package_arn, "region": session.region_name}
    # A deployed stage's endpoint captures as its EndpointConfig says; a model served by itself does not
    capture = DataCapture.of_endpoint(session, endpoint_name) if not (model_data or model_package) else None
    if capture:
        print(f"capturing {capture.sampling_percentage}% of invocations to {capture.destination}/{endpoint_name}/")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with serving(source, session, endpoint_name, host=host, port=port, record=record,
                 capture=capture) as server:
        print(f"endpoint {endpoint_name} is serving at {server.url} (GET /ping, POST /invocations, "
              f"POST /endpoints/{endpoint_name}/invocations); Ctrl-C stops it\n"
              f"try it: flanops invoke \"#Person1#: ... #Person2#: ...\"\n"
              f"or boto3: boto3.client('sagemaker-runtime', endpoint_url='{server.url}')"
              f".invoke_endpoint(EndpointName='{endpoint_name}', ContentType='application/json', "
              "Body='{\"inputs\": \"...\"}')", flush=True)
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
    print(f"endpoint {endpoint_name} stopped")
    return 0


def model_to_serve(session, group: str, stage: str | None, model_package: str | None, model_data: str | None,
                   endpoint_name: str | None) -> tuple[str, str, str | None]:
    """(model data, endpoint name, model package ARN) for ``flanops serve``'s choice of model."""
    from flanops.infra.deploy import deployed, describe_package

    if model_data:
        return model_data, endpoint_name or "flanops-local", None
    if model_package:
        package = describe_package(session.client("sagemaker"), model_package)
        name = endpoint_name or f"{package['ModelPackageGroupName']}-v{package.get('ModelPackageVersion', 0)}"
        return model_data_url(package), name, package["ModelPackageArn"]
    stage = stage or "staging"
    result = deployed(session, stage, group)
    if result is None or not result.endpoint_name:
        raise FlanopsError(f"nothing is deployed to stage {stage} for model package group {group}; deploy first: "
                           f"flanops deploy --stage {stage} (or serve --model-package ARN / --model-data PATH)")
    package = describe_package(session.client("sagemaker"), result.model_package_arn)
    return model_data_url(package), endpoint_name or result.endpoint_name, package["ModelPackageArn"]


def model_data_url(package: dict) -> str:
    containers = package.get("InferenceSpecification", {}).get("Containers", [])
    if not containers or not containers[0].get("ModelDataUrl"):
        raise FlanopsError(f"model package {package['ModelPackageArn']} names no ModelDataUrl to serve")
    return containers[0]["ModelDataUrl"]


def invoke(config: PipelineConfig, text: str, target: TargetChoice = LOCAL, endpoint: str | None = None,
           stage: str = "staging", max_new_tokens: int | None = None, num_beams: int | None = None) -> int:
    """Summarize ``text`` (``-``: standard input) with an endpoint: the one served here, or ``stage``'s on AWS."""
    import sys

    from flanops.infra.serving import running_endpoints, runtime_client, summarize_remotely

    text = sys.stdin.read() if text == "-" else text
    if not text.strip():
        raise FlanopsError("nothing to summarize: give the dialogue as the argument, or - to read standard input")
    parameters = {name: value for name, value in (("max_new_tokens", max_new_tokens),
                                                  ("num_beams", num_beams)) if value is not None}
    if target.aws:
        session = aws_session()
        name = endpoint or deployed_endpoint(session, config, stage)
        client = session.client("sagemaker-runtime")
    else:
        endpoints = running_endpoints()
        if not endpoints:
            raise FlanopsError("no local endpoint is being served; start one in another shell: "
                               "flanops serve --stage staging")
        if endpoint and endpoint not in endpoints:
            raise FlanopsError(f"no local endpoint {endpoint!r}; being served: {', '.join(endpoints)}")
        if not endpoint and len(endpoints) > 1:
            raise FlanopsError(f"several local endpoints are being served ({', '.join(endpoints)}); pick one "
                               "with --endpoint NAME")
        record = endpoints[endpoint or next(iter(endpoints))]
        name, client = record["endpoint_name"], runtime_client(record["url"], record["region"])
    print(summarize_remotely(client, name, [text], parameters)[0])
    return 0


def deployed_endpoint(session, config: PipelineConfig, stage: str) -> str:
    from flanops.infra.deploy import deployed

    result = deployed(session, stage, package_group(config))
    if result is None or not result.endpoint_name:
        raise FlanopsError(f"no endpoint deployed to stage {stage}; pass --endpoint NAME or deploy first")
    return result.endpoint_name


# ----------------------------------------------------------------------------- benchmarks
def bench(quick: bool = False, models: str = "flan-t5-small,flan-t5-base", sections: str | None = None,
          out: Path | None = None) -> int:
    """``flanops bench``: the benchmarks in benchmarks/ (imported only here: they load torch)."""
    import sys

    from flanops import benchmarks

    models = benchmarks.resolve_models([name for name in models.split(",") if name.strip()])
    sections = benchmarks.resolve_sections(sections)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = out or Path("benchmarks") / "results" / stamp
    settings = benchmarks.preset("quick" if quick else "full", models, sections)
    results = benchmarks.run(settings, out, progress=lambda line: print(line, flush=True),
                             command=" ".join(["flanops", *sys.argv[1:]]))
    print(f"\nbenchmarks finished in {results['wall_seconds']:.0f} s")
    for item in results["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[item["met"]]
        measured = "–" if item["measured"] is None else f"{item['measured']:,.4g} {item['unit']}"
        print(f"  {verdict:>12}  {item['description']}: {measured} ({item['comparison']} {item['threshold']:g})")
    if results["failed_sections"]:
        print(f"failed sections: {', '.join(results['failed_sections'])} (see results.json)")
    print(f"results: {Path(out) / 'results.json'}\nreport:  {Path(out) / 'BENCHMARKS.md'}")
    return 1 if results["failed_sections"] else 0
