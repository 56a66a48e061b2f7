"""Approve a model package, pick the package to deploy, and create/update/delete the endpoint stack.

    package = resolve_package(session, latest_approved=True, group="flanops", stage=load_stage("prod"))
    result = deploy(session, load_stage("prod"), package, default_bucket=bucket)
    result.outputs["EndpointName"]

Stacks change only through change sets (CreateChangeSet → wait → ExecuteChangeSet → wait), so
an update that CloudFormation cannot apply rolls back and the endpoint keeps serving the
previous configuration. The same calls run against AWS and against moto (embedded AWS). Where
moto differs, the code says so:
- moto applies a change set inside ExecuteChangeSet and has no rollback: a resource that
  fails makes ExecuteChangeSet itself return an error (after moto's retries, often a follow-on
  one), and resources changed before the failure stay changed, so a stack can be left that
  moto cannot delete. That error is reported as a failed update here; real CloudFormation returns
  from ExecuteChangeSet at once and reports failures through stack events.
- moto never refreshes a stack's Outputs after ExecuteChangeSet; when a stack reports none,
  they are resolved from its resources (:func:`_outputs_from_resources`).
- moto's UpdateModelPackage clears CustomerMetadataProperties that the request leaves out,
  so :func:`approve` sends them back unchanged (a no-op for SageMaker).
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flanops.pipelines.errors import FlanopsError

from .stages import StageConfig
from .template import build_template, lint_template, stack_name, write_template

if TYPE_CHECKING:
    import boto3

APPROVED = "Approved"
PENDING = "PendingManualApproval"
REJECTED = "Rejected"

POLL_SECONDS = 5.0
STACK_TIMEOUT_SECONDS = 90 * 60  # an endpoint with several large instances can take most of an hour
NO_CHANGES = ("didn't contain changes", "No updates are to be performed")
# Stack states that hold no resources worth keeping: a create that never ran or rolled back.
EMPTY_STATES = ("REVIEW_IN_PROGRESS", "ROLLBACK_COMPLETE")

Echo = Callable[[str], None]


@dataclass
class DeployResult:
    stack_name: str
    stack_id: str
    status: str                   # the stack's CloudFormation status, e.g. CREATE_COMPLETE
    action: str                   # "created", "updated" or "unchanged" (already deployed)
    model_package_arn: str
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def endpoint_name(self) -> str | None:
        return self.outputs.get("EndpointName")


# ---------------------------------------------------------------------------------------------
# Model Registry: approval and choosing the package
# ---------------------------------------------------------------------------------------------

def approve(session: boto3.Session, model_package_arn: str, description: str | None = None) -> dict[str, Any]:
    """Mark a model package Approved (the manual gate before prod); returns the updated description."""
    sagemaker = session.client("sagemaker")
    package = describe_package(sagemaker, model_package_arn)
    request: dict[str, Any] = {"ModelPackageArn": package["ModelPackageArn"], "ModelApprovalStatus": APPROVED}
    if description:
        request["ApprovalDescription"] = description
    if package.get("CustomerMetadataProperties"):
        request["CustomerMetadataProperties"] = package["CustomerMetadataProperties"]  # see the module docstring
    sagemaker.update_model_package(**request)
    return describe_package(sagemaker, package["ModelPackageArn"])


def resolve_package(session: boto3.Session, *, model_package_arn: str | None = None, latest_approved: bool = False,
                    group: str | None = None, stage: StageConfig) -> dict[str, Any]:
    """The describe_model_package response of the package to deploy to ``stage``.

    Either ``model_package_arn``, or ``latest_approved`` with ``group`` (the newest Approved
    version). Refuses a package that ``stage`` may not serve (see :func:`check_approval`).
    """
    if bool(model_package_arn) == bool(latest_approved):
        raise FlanopsError("give either a model package ARN or --latest-approved with a model package group")
    sagemaker = session.client("sagemaker")
    if model_package_arn:
        package = describe_package(sagemaker, model_package_arn)
        if group and package.get("ModelPackageGroupName") != group:
            raise FlanopsError(f"model package {model_package_arn} belongs to group "
                               f"{package.get('ModelPackageGroupName')}, not {group}")
    else:
        if not group:
            raise FlanopsError("--latest-approved needs the model package group to pick from")
        package = describe_package(sagemaker, _latest_approved_arn(sagemaker, group))
    check_approval(package, stage)
    return package


def check_approval(package: dict[str, Any], stage: StageConfig) -> None:
    """A stage with require_approval serves Approved packages only; no stage serves a Rejected one.

    Registration happens only after the pipeline's quality gate passed, so a package still
    PendingManualApproval has passed the gate: good enough for staging, not for prod.
    """
    arn = package["ModelPackageArn"]
    status = package.get("ModelApprovalStatus", PENDING)
    if status == REJECTED:
        raise FlanopsError(f"model package {arn} is Rejected; no stage deploys it")
    if stage.require_approval and status != APPROVED:
        raise FlanopsError(f"stage {stage.name} deploys Approved model packages only, and {arn} is {status}. "
                           f"Review it, then approve it: flanops approve {arn}")


def describe_package(sagemaker, model_package_arn: str) -> dict[str, Any]:
    from botocore.exceptions import ClientError

    try:
        package = sagemaker.describe_model_package(ModelPackageName=model_package_arn)
    except ClientError as err:
        raise FlanopsError(f"model package {model_package_arn}: {_message(err)} (region "
                           f"{sagemaker.meta.region_name}); list a group's versions with: aws sagemaker "
                           "list-model-packages --model-package-group-name GROUP") from None
    package.pop("ResponseMetadata", None)
    return package


def _latest_approved_arn(sagemaker, group: str) -> str:
    from botocore.exceptions import ClientError

    try:
        sagemaker.describe_model_package_group(ModelPackageGroupName=group)
    except ClientError as err:
        raise FlanopsError(f"model package group {group}: {_message(err)} (region {sagemaker.meta.region_name}); "
                           "flanops run registers models in it") from None

    def versions(status: str) -> list[dict]:
        paginator = sagemaker.get_paginator("list_model_packages")
        pages = paginator.paginate(ModelPackageGroupName=group, ModelApprovalStatus=status)
        return [summary for page in pages for summary in page["ModelPackageSummaryList"]]

    def newest(summaries: list[dict]) -> dict:
        return max(summaries, key=lambda s: (s.get("ModelPackageVersion", 0), s.get("CreationTime")))

    approved = versions(APPROVED)
    if approved:
        return newest(approved)["ModelPackageArn"]
    pending = versions(PENDING)
    hint = (f"; the newest pending one is {newest(pending)['ModelPackageArn']}: review it, then "
            f"flanops approve {newest(pending)['ModelPackageArn']}") if pending else ""
    raise FlanopsError(f"model package group {group} has no Approved version{hint}")


# ---------------------------------------------------------------------------------------------
# The stack
# ---------------------------------------------------------------------------------------------

def dry_run(stage: StageConfig, package: dict[str, Any], *, default_bucket: str | None, out: str | Path,
            region: str | None = None, echo: Echo = print) -> Path:
    """Write the template that :func:`deploy` would submit, lint it (for ``region``), and create nothing."""
    check_approval(package, stage)
    template = build_template(package, stage, default_bucket=default_bucket)
    path = write_template(template, out)
    findings = lint_template(template, regions=[region] if region else None)
    echo(f"wrote {path}: stack {stack_name(package['ModelPackageGroupName'], stage.name)}, "
         f"{len(template['Resources'])} resources; cfn-lint: {'clean' if not findings else f'{len(findings)} finding(s)'}")
    for finding in findings:
        echo(f"  {_shorten(finding)}")
    return path


def deploy(session: boto3.Session, stage: StageConfig, package: dict[str, Any], *, default_bucket: str | None,
           echo: Echo = print, lint: bool = True, poll_seconds: float = POLL_SECONDS,
           timeout_seconds: float = STACK_TIMEOUT_SECONDS) -> DeployResult:
    """Create or update the stage's endpoint stack so that it serves ``package``.

    ``lint``: run cfn-lint first and refuse a template with errors (nothing is created).
    """
    from botocore.exceptions import ClientError

    check_approval(package, stage)
    arn, group = package["ModelPackageArn"], package["ModelPackageGroupName"]
    template = build_template(package, stage, default_bucket=default_bucket)
    if lint:
        errors = [finding for finding in lint_template(template, regions=[_region(session)]) if finding.startswith("E")]
        if errors:
            raise FlanopsError(f"stage {stage.name} ({stage.source}): cfn-lint rejects the endpoint template, "
                               "nothing was deployed:\n  " + "\n  ".join(_shorten(e) for e in errors))
    cfn = session.client("cloudformation")
    name = stack_name(group, stage.name)
    existing = _prepare_stack(cfn, name, echo, poll_seconds, timeout_seconds)
    serving = _stack_outputs(session, existing) if existing else {}
    change_type = "UPDATE" if existing else "CREATE"
    echo(f"{'updating' if existing else 'creating'} stack {name}: stage {stage.name}, model package {arn}")

    change_set_name = f"flanops-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    try:
        created = cfn.create_change_set(
            StackName=name, ChangeSetName=change_set_name, ChangeSetType=change_type,
            TemplateBody=json.dumps(template), Capabilities=["CAPABILITY_IAM"],
            Description=f"flanops deploy of {arn} to {stage.name}"[:1024])
    except ClientError as err:
        raise FlanopsError(f"stack {name}: CloudFormation refused the change set: {_message(err)}") from None
    change_set = _wait_for_change_set(cfn, created["Id"], poll_seconds, timeout_seconds)

    if change_set["Status"] == "FAILED":
        reason = change_set.get("StatusReason", "no reason given")
        cfn.delete_change_set(ChangeSetName=created["Id"])
        if existing and any(marker in reason for marker in NO_CHANGES):
            echo(f"stack {name} is already deployed: it serves {arn} with this stage config, nothing to change")
            return _result(session, created["StackId"], "unchanged", arn, template)
        if not existing:
            _delete_quietly(cfn, created["StackId"])  # a CREATE change set leaves an empty stack behind
        raise FlanopsError(f"stack {name}: CloudFormation could not prepare the change: {reason}")

    for change in change_set.get("Changes", []):
        detail = change.get("ResourceChange", {})
        replacement = " (replacement)" if detail.get("Replacement") == "True" else ""
        echo(f"  {detail.get('Action', '?')} {detail.get('LogicalResourceId')} ({detail.get('ResourceType')}){replacement}")

    earlier_events = {event["EventId"] for event in _events(cfn, created["StackId"])}
    try:
        cfn.execute_change_set(ChangeSetName=created["Id"])
    except ClientError as err:
        # Real CloudFormation refuses here only before changing anything; moto applies the
        # change set inside this call and reports a failing resource here (see the docstring).
        raise _failure(name, change_type, _message(err), serving) from None
    stack = _wait_for_stack(cfn, created["StackId"], earlier_events, echo, poll_seconds, timeout_seconds)
    status = stack["StackStatus"]
    if status not in ("CREATE_COMPLETE", "UPDATE_COMPLETE"):
        reason = _failure_reason(cfn, created["StackId"], earlier_events, stack)
        raise _failure(name, change_type, reason, serving, status)
    result = _result(session, created["StackId"], "created" if change_type == "CREATE" else "updated", arn, template)
    echo(f"stack {name}: {status}; endpoint {result.endpoint_name} serves {arn}")
    return result


def destroy(session: boto3.Session, stage_name: str, group: str, echo: Echo = print,
            poll_seconds: float = POLL_SECONDS, timeout_seconds: float = STACK_TIMEOUT_SECONDS) -> str:
    """Delete the stage's endpoint stack (endpoint, config, model, role, scaling, alarms); returns its name.

    Data captured to S3 is kept: it is not part of the stack.
    """
    from botocore.exceptions import ClientError

    cfn = session.client("cloudformation")
    name = stack_name(group, stage_name)
    stack = _describe_stack(cfn, name)
    if stack is None:
        raise FlanopsError(f"no stack {name} (model package group {group}, stage {stage_name}) in region "
                           f"{_region(session)}: nothing to destroy")
    echo(f"deleting stack {name} ({stack['StackStatus']})")
    earlier_events = {event["EventId"] for event in _events(cfn, stack["StackId"])}
    try:
        cfn.delete_stack(StackName=stack["StackId"])
    except ClientError as err:  # moto deletes inside DeleteStack and reports a failing resource here
        raise FlanopsError(f"deleting stack {name} failed: {_message(err)}") from None
    final = _wait_for_stack(cfn, stack["StackId"], earlier_events, echo, poll_seconds, timeout_seconds)
    if final["StackStatus"] != "DELETE_COMPLETE":
        reason = _failure_reason(cfn, stack["StackId"], earlier_events, final)
        raise FlanopsError(f"deleting stack {name} failed ({final['StackStatus']}): {reason}. "
                           "Fix or remove the resource named there, then destroy again")
    echo(f"stack {name}: DELETE_COMPLETE")
    return name


def deployed(session: boto3.Session, stage_name: str, group: str) -> DeployResult | None:
    """What the stage's stack serves now (None when there is no such stack or it holds no endpoint)."""
    cfn = session.client("cloudformation")
    stack = _describe_stack(cfn, stack_name(group, stage_name))
    if stack is None or stack["StackStatus"] in EMPTY_STATES or stack["StackStatus"].startswith("DELETE"):
        return None
    outputs = _stack_outputs(session, stack)
    return DeployResult(stack_name=stack["StackName"], stack_id=stack["StackId"], status=stack["StackStatus"],
                        action="unchanged", model_package_arn=outputs.get("ModelPackageArn", ""), outputs=outputs)


# ---------------------------------------------------------------------------------------------
# CloudFormation helpers
# ---------------------------------------------------------------------------------------------

def _prepare_stack(cfn, name: str, echo: Echo, poll_seconds: float, timeout_seconds: float) -> dict | None:
    """The stack to update, or None to create one (after removing an empty leftover)."""
    stack = _describe_stack(cfn, name)
    if stack is None:
        return None
    status = stack["StackStatus"]
    if status in EMPTY_STATES:
        echo(f"removing stack {name}, left {status} by an earlier deploy (it serves nothing)")
        earlier_events = {event["EventId"] for event in _events(cfn, stack["StackId"])}
        cfn.delete_stack(StackName=stack["StackId"])
        final = _wait_for_stack(cfn, stack["StackId"], earlier_events, echo, poll_seconds, timeout_seconds)
        if final["StackStatus"] != "DELETE_COMPLETE":
            raise FlanopsError(f"stack {name}: could not remove the stack left by an earlier deploy "
                               f"({final['StackStatus']}); delete it in the CloudFormation console")
        return None
    if status.endswith("_IN_PROGRESS"):
        raise FlanopsError(f"stack {name} is busy ({status}); wait until it settles, then deploy again")
    if status.endswith("_FAILED"):
        raise FlanopsError(f"stack {name} is {status}: {stack.get('StackStatusReason', 'see its events')}. "
                           "Repair it in the CloudFormation console (or flanops destroy it), then deploy again")
    return stack


def _describe_stack(cfn, name_or_id: str) -> dict | None:
    from botocore.exceptions import ClientError

    try:
        return cfn.describe_stacks(StackName=name_or_id)["Stacks"][0]
    except ClientError as err:
        if "does not exist" in _message(err):
            return None
        raise


def _wait_for_change_set(cfn, change_set_id: str, poll_seconds: float, timeout_seconds: float) -> dict:
    deadline = time.monotonic() + timeout_seconds
    while True:
        change_set = cfn.describe_change_set(ChangeSetName=change_set_id)
        if change_set["Status"] in ("CREATE_COMPLETE", "FAILED"):
            return change_set
        if time.monotonic() > deadline:
            raise FlanopsError(f"change set {change_set_id} still {change_set['Status']} after {timeout_seconds:.0f} s")
        time.sleep(poll_seconds)


def _wait_for_stack(cfn, stack_id: str, earlier_events: set[str], echo: Echo, poll_seconds: float,
                    timeout_seconds: float) -> dict:
    """Poll until the operation started after ``earlier_events`` settles, echoing each new event once."""
    seen_events = set(earlier_events)
    stack_statuses: set[str] = set()  # the stack's own events since the operation started
    deadline = time.monotonic() + timeout_seconds
    while True:
        stack = cfn.describe_stacks(StackName=stack_id)["Stacks"][0]
        status = stack["StackStatus"]
        for event in reversed([e for e in _events(cfn, stack_id) if e["EventId"] not in seen_events]):
            seen_events.add(event["EventId"])
            reason = f": {event['ResourceStatusReason']}" if event.get("ResourceStatusReason") else ""
            echo(f"  {event['LogicalResourceId']} {event['ResourceStatus']}{reason}")
            if event["LogicalResourceId"] == stack["StackName"]:
                stack_statuses.add(event["ResourceStatus"])
        # A settled status counts once the stack has an event for it: before that, it may be the
        # status left by the previous operation.
        if not status.endswith("_IN_PROGRESS") and status in stack_statuses:
            return stack
        if time.monotonic() > deadline:
            raise FlanopsError(f"stack {stack['StackName']} still {stack['StackStatus']} after {timeout_seconds:.0f} s; "
                               f"follow it with: aws cloudformation describe-stack-events --stack-name {stack['StackName']}")
        time.sleep(poll_seconds)


def _events(cfn, stack_id: str) -> list[dict]:
    """The stack's events, newest first."""
    paginator = cfn.get_paginator("describe_stack_events")
    return [event for page in paginator.paginate(StackName=stack_id) for event in page["StackEvents"]]


def _failure_reason(cfn, stack_id: str, earlier_events: set[str], stack: dict) -> str:
    """The first resource failure of this operation: later ones are mostly cancellations it caused."""
    failures = [event for event in reversed(_events(cfn, stack_id))
                if event["EventId"] not in earlier_events
                and event["ResourceStatus"].endswith("_FAILED") and event.get("ResourceStatusReason")
                and "cancelled" not in event["ResourceStatusReason"]]
    if failures:
        first = failures[0]
        return f"{first['LogicalResourceId']} ({first['ResourceType']}): {first['ResourceStatusReason']}"
    return stack.get("StackStatusReason") or "no reason in the stack's events"


def _failure(name: str, change_type: str, reason: str, outputs: dict[str, str], status: str | None = None) -> FlanopsError:
    reason = reason.rstrip(".")
    if change_type == "CREATE":
        return FlanopsError(f"creating stack {name} failed: {reason}. Nothing is serving; fix the cause and deploy "
                            "again (the failed stack is replaced)")
    serving = f"endpoint {outputs['EndpointName']} keeps serving" if outputs.get("EndpointName") else "the endpoint keeps"
    package = f" {outputs['ModelPackageArn']}" if outputs.get("ModelPackageArn") else " its previous model"
    if status == "UPDATE_ROLLBACK_FAILED":
        return FlanopsError(f"updating stack {name} failed: {reason}, and so did the rollback (UPDATE_ROLLBACK_FAILED). "
                            "Continue the rollback in the CloudFormation console, then deploy again")
    rolled_back = "The stack rolled back" if status else "The stack was not updated"
    return FlanopsError(f"updating stack {name} failed: {reason}. {rolled_back}: {serving}{package}")


def _result(session, stack_id: str, action: str, model_package_arn: str, template: dict) -> DeployResult:
    stack = session.client("cloudformation").describe_stacks(StackName=stack_id)["Stacks"][0]
    return DeployResult(stack_name=stack["StackName"], stack_id=stack["StackId"], status=stack["StackStatus"],
                        action=action, model_package_arn=model_package_arn,
                        outputs=_stack_outputs(session, stack, template))


def _stack_outputs(session, stack: dict, template: dict | None = None) -> dict[str, str]:
    """The stack's Outputs as a dict (``template``: the stack's template, when the caller has it)."""
    outputs = {output["OutputKey"]: output["OutputValue"] for output in stack.get("Outputs", [])}
    if outputs:
        return outputs
    if template is None:
        body = session.client("cloudformation").get_template(StackName=stack["StackId"])["TemplateBody"]
        template = json.loads(body) if isinstance(body, str) else body
    return _outputs_from_resources(session, stack["StackId"], template) if template.get("Outputs") else {}


def _outputs_from_resources(session, stack_id: str, template: dict) -> dict[str, str]:
    """The template's Outputs, resolved from the stack's resources.

    Only for moto: it never refreshes a stack's Outputs after ExecuteChangeSet (they stay those
    of the empty stack that CreateChangeSet made). CloudFormation always reports them.
    Handles what our templates output: literals and Fn::GetAtt of a SageMaker resource's name
    (its physical id is its ARN, which ends with the name) or a role's Arn.
    """
    cfn = session.client("cloudformation")
    pages = cfn.get_paginator("list_stack_resources").paginate(StackName=stack_id)
    physical = {r["LogicalResourceId"]: r.get("PhysicalResourceId", "") for page in pages
                for r in page["StackResourceSummaries"]}
    outputs = {}
    for key, output in template["Outputs"].items():
        value = output["Value"]
        if isinstance(value, str):
            outputs[key] = value
        elif "Fn::GetAtt" in value and value["Fn::GetAtt"][0] in physical:
            logical, attribute = value["Fn::GetAtt"]
            resource_type = template["Resources"][logical]["Type"]
            if resource_type == "AWS::IAM::Role" and attribute == "Arn":
                outputs[key] = session.client("iam").get_role(RoleName=physical[logical])["Role"]["Arn"]
            elif resource_type.startswith("AWS::SageMaker::") and attribute.endswith("Name"):
                outputs[key] = physical[logical].rpartition("/")[2]
    return outputs


def _delete_quietly(cfn, stack_id: str) -> None:
    from botocore.exceptions import ClientError

    try:
        cfn.delete_stack(StackName=stack_id)
    except ClientError:
        pass  # the leftover is removed by the next deploy anyway (EMPTY_STATES)


def _region(session) -> str:
    if not session.region_name:
        raise FlanopsError("no AWS region: set AWS_REGION (or AWS_DEFAULT_REGION) or a profile's region")
    return session.region_name


def _message(err) -> str:
    return err.response.get("Error", {}).get("Message") or str(err)


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + " …"
