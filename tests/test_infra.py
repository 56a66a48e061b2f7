"""The endpoint stack: stage configs, the template (cfn-lint, least privilege), approval, deploy/update/destroy.

Stacks are created in moto's in-process ``mock_aws`` (no server). moto has no rollback, so the
rollback that real CloudFormation reports through stack events is checked against a stubbed
CloudFormation client (botocore's Stubber checks every response against the API's shapes).
"""
from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from flanops.pipelines.errors import FlanopsError
from flanops.infra.deploy import approve, deploy, destroy, dry_run, resolve_package
from flanops.infra.stages import load_stage, parse_stage, shipped_stages
from flanops.infra.template import build_template, lint_template, stack_name

# moto's CloudFormation creates IAM roles and SageMaker models, endpoint configs and endpoints,
# and skips (with this warning) the autoscaling target, the scaling policy and the alarms.
pytestmark = pytest.mark.filterwarnings("ignore:Tried to parse AWS::")

REGION = "us-east-1"
GROUP = "flanops"
BUCKET = "flanops-artifacts"
DEFAULT_BUCKET = "sagemaker-us-east-1-123456789012"
IMAGE = ("763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-pytorch-inference:"
         "2.6.0-transformers4.51.3-cpu-py312-ubuntu22.04")
SERVERLESS = {"name": "dev", "require_approval": False, "serverless": {"memory_size_mb": 3072, "max_concurrency": 2},
              "data_capture": {"enabled": False}}


def package_dict(version: int = 1, status: str = "Approved", *, region: str = "eu-west-1",
                 account: str = "111122223333", image: str = IMAGE) -> dict:
    """A describe_model_package response, as the pipeline's RegisterModel step leaves it."""
    return {"ModelPackageArn": f"arn:aws:sagemaker:{region}:{account}:model-package/{GROUP}/{version}",
            "ModelPackageGroupName": GROUP, "ModelPackageVersion": version, "ModelApprovalStatus": status,
            "InferenceSpecification": {"Containers": [{
                "Image": image, "ModelDataUrl": f"s3://{BUCKET}/{GROUP}/run-{version}/Evaluate/model/model.tar.gz"}]}}


def statements(template: dict) -> list[dict]:
    return template["Resources"]["ExecutionRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def strings_in(node) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings_in(value)


def resolved_join(value) -> str:
    """An Fn::Join of literals and pseudo parameters, as CloudFormation resolves it in the us-east-1 test account."""
    pseudo = {"AWS::Partition": "aws", "AWS::Region": REGION, "AWS::AccountId": "123456789012"}
    separator, parts = value["Fn::Join"]
    return separator.join(part if isinstance(part, str) else pseudo[part["Ref"]] for part in parts)


# ---------------------------------------------------------------------------------------------
# Stage configs
# ---------------------------------------------------------------------------------------------

def test_shipped_stages_are_valid_and_sized_per_stage():
    assert set(shipped_stages()) >= {"staging", "prod"}
    staging, prod = load_stage("staging"), load_stage("prod")
    assert (staging.instance_type, staging.initial_instance_count) == ("ml.m5.large", 1)
    assert (staging.autoscaling.min_capacity, staging.autoscaling.max_capacity) == (1, 2)
    assert (prod.instance_type, prod.initial_instance_count) == ("ml.m5.xlarge", 2)
    assert (prod.autoscaling.min_capacity, prod.autoscaling.max_capacity) == (2, 4)
    assert staging.require_approval is False and prod.require_approval is True
    assert staging.source.endswith("staging.json")


def test_stage_from_a_path_takes_its_name_from_the_file(tmp_path: Path):
    path = tmp_path / "canary.json"
    path.write_text(json.dumps({"instance_type": "ml.c5.xlarge"}))
    stage = load_stage(str(path))
    assert (stage.name, stage.instance_type, stage.initial_instance_count) == ("canary", "ml.c5.xlarge", 1)
    assert stage.require_approval is True  # a stage must opt out of the manual gate


@pytest.mark.parametrize(("content", "expected"), [
    ('{"instance_type": "ml.m5.large",\n "initial_instance_count": }', "line 2 column 28: not valid JSON"),
    ('["ml.m5.large"]', "expected a JSON object"),
    ('{"instance_type": "ml.m5.large", "instance_count": 2}', "instance_count: Extra inputs are not permitted"),
    ('{"instance_type": "m5.large"}', "instance_type: expected a SageMaker instance type such as ml.m5.large (given 'm5.large')"),
    ('{"instance_type": "ml.m5.large", "autoscaling": {"min_capacity": 3, "max_capacity": 2}}',
     "autoscaling: min_capacity (3) is above max_capacity (2)"),
    ('{"instance_type": "ml.m5.large", "initial_instance_count": 5, "autoscaling": {"min_capacity": 1, "max_capacity": 2}}',
     "initial_instance_count (5) is outside autoscaling's min_capacity..max_capacity (1..2)"),
    ('{"serverless": {"memory_size_mb": 2048}}', "serverless endpoints cannot capture data"),
    ('{"serverless": {}, "instance_type": "ml.m5.large", "data_capture": {"enabled": false}}',
     "a serverless stage has no instance_type"),
    ('{"serverless": {"memory_size_mb": 1000}, "data_capture": {"enabled": false}}', "serverless.memory_size_mb"),
    ('{"instance_type": "ml.m5.large", "data_capture": {"sampling_percentage": 150}}',
     "data_capture.sampling_percentage: Input should be less than or equal to 100"),
    ('{"instance_type": "ml.m5.large", "data_capture": {"s3_uri": "my-bucket/capture"}}',
     "data_capture.s3_uri: expected an s3://bucket/prefix URI (given 'my-bucket/capture')"),
    ('{"instance_type": "ml.m5.large", "kms_key_id": "my key"}', "kms_key_id: expected a KMS key id, key ARN"),
    ('{}', "set instance_type (e.g. ml.m5.large) or 'serverless'"),
])
def test_bad_stage_config_names_file_and_field(tmp_path: Path, content: str, expected: str):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(FlanopsError) as caught:
        load_stage(str(path))
    assert str(caught.value).startswith(str(path))
    assert expected in str(caught.value)


def test_bad_stage_name_and_unknown_stage(tmp_path: Path):
    path = tmp_path / "my_stage.json"
    path.write_text('{"instance_type": "ml.m5.large"}')
    with pytest.raises(FlanopsError, match=r"name: 'my_stage' is not a stage name.*rename the file"):
        load_stage(str(path))
    with pytest.raises(FlanopsError, match=r"--stage qa: no such file; give a JSON file or a shipped stage \(prod, staging"):
        load_stage("qa")


# ---------------------------------------------------------------------------------------------
# The template
# ---------------------------------------------------------------------------------------------

STAGES_TO_LINT = {
    "staging": lambda: load_stage("staging"),
    "prod": lambda: load_stage("prod"),
    "serverless": lambda: parse_stage(SERVERLESS),
    "kms-and-alarm-topic": lambda: parse_stage({
        "name": "secure", "instance_type": "ml.m5.large", "kms_key_id": "1234abcd-12ab-34cd-56ef-1234567890ab",
        "alarms": {"notify_topic_arn": "arn:aws:sns:eu-west-1:111122223333:endpoint-alarms"}}),
}


@pytest.mark.parametrize("stage_name", STAGES_TO_LINT)
def test_template_passes_cfn_lint(stage_name: str):
    template = build_template(package_dict(), STAGES_TO_LINT[stage_name](), default_bucket=DEFAULT_BUCKET)
    assert lint_template(template, regions=["us-east-1", "eu-west-1"]) == []


def test_lint_catches_what_cloudformation_would_reject():
    stage = parse_stage({"name": "typo", "instance_type": "ml.m5.huge"})
    findings = lint_template(build_template(package_dict(), stage, default_bucket=DEFAULT_BUCKET))
    assert any("'ml.m5.huge' is not one of" in finding for finding in findings)


def test_role_policy_is_least_privilege():
    template = build_template(package_dict(), load_stage("prod"), default_bucket=DEFAULT_BUCKET)
    policy = statements(template)
    for statement in policy:
        actions, resources = as_list(statement["Action"]), as_list(statement["Resource"])
        assert not any(action == "*" or action.endswith(":*") for action in actions), statement
        if resources == ["*"]:
            assert actions == ["ecr:GetAuthorizationToken"], statement  # the one action without resource-level permissions
    s3 = {statement["Sid"]: statement for statement in policy if any(a.startswith("s3:") for a in statement["Action"])}
    assert set(s3) == {"ReadModelArtifacts", "WriteDataCapture"}
    assert s3["ReadModelArtifacts"]["Action"] == ["s3:GetObject"]
    assert [resolved_join(r) for r in s3["ReadModelArtifacts"]["Resource"]] == [
        f"arn:aws:s3:::{BUCKET}/{GROUP}/run-1/Evaluate/model/*"]
    assert s3["WriteDataCapture"]["Action"] == ["s3:PutObject"]
    assert [resolved_join(r) for r in s3["WriteDataCapture"]["Resource"]] == [
        f"arn:aws:s3:::{DEFAULT_BUCKET}/{GROUP}/prod/data-capture/*"]
    logs = next(statement for statement in policy if statement["Sid"] == "WriteEndpointLogs")
    assert [resolved_join(r) for r in logs["Resource"]] == [
        "arn:aws:logs:us-east-1:123456789012:log-group:/aws/sagemaker/Endpoints/*",
        "arn:aws:logs:us-east-1:123456789012:log-group:/aws/sagemaker/Endpoints/*:log-stream:*"]
    ecr = next(statement for statement in policy if statement["Sid"] == "PullInferenceImage")
    assert [resolved_join(r) for r in ecr["Resource"]] == [
        "arn:aws:ecr:us-east-1:763104351884:repository/huggingface-pytorch-inference"]
    assert not any(statement["Sid"] == "UseKmsKey" for statement in policy)


def test_kms_and_capture_uri_from_stage_scope_the_policy():
    stage = parse_stage({"name": "secure", "instance_type": "ml.m5.large", "kms_key_id": "alias/endpoints",
                         "data_capture": {"s3_uri": "s3://capture-bucket/flan/"}})
    template = build_template(package_dict(), stage, default_bucket=DEFAULT_BUCKET)
    policy = {statement["Sid"]: statement for statement in statements(template)}
    assert policy["UseKmsKey"]["Condition"] == {"ForAnyValue:StringEquals": {"kms:ResourceAliases": "alias/endpoints"}}
    assert [resolved_join(r) for r in policy["WriteDataCapture"]["Resource"]] == ["arn:aws:s3:::capture-bucket/flan/*"]
    config = template["Resources"]["EndpointConfig"]["Properties"]
    assert config["KmsKeyId"] == config["DataCaptureConfig"]["KmsKeyId"] == "alias/endpoints"
    assert config["DataCaptureConfig"]["DestinationS3Uri"] == "s3://capture-bucket/flan"
    assert template["Outputs"]["DataCaptureS3Uri"]["Value"] == "s3://capture-bucket/flan"


def test_template_hard_codes_no_names_regions_or_accounts():
    """Package and image live in eu-west-1: no other region, and no ARN but the package's, may appear."""
    package = package_dict(image=IMAGE.replace("us-east-1", "eu-west-1"))
    template = build_template(package, load_stage("staging"), default_bucket="my-bucket")
    resources = template["Resources"]
    for logical_id, name_property in [("Model", "ModelName"), ("EndpointConfig", "EndpointConfigName"),
                                      ("Endpoint", "EndpointName"), ("ExecutionRole", "RoleName")]:
        assert name_property not in resources[logical_id]["Properties"]  # CloudFormation names them
    package_arn = package["ModelPackageArn"]
    for text in strings_in(resources):
        assert "us-east-1" not in text and "123456789012" not in text, text
        assert not text.startswith("arn:aws") or text == package_arn, text  # ARNs are built from AWS::Partition
    assert set(template["Outputs"]) == {"EndpointName", "EndpointConfigName", "ModelName", "RoleArn",
                                        "ModelPackageArn", "DataCaptureS3Uri", "Stage"}
    tags = {tag["Key"]: tag["Value"] for tag in resources["Endpoint"]["Properties"]["Tags"]}
    assert tags == {"flanops:stage": "staging", "flanops:model-package-group": GROUP,
                    "flanops:model-package-arn": package_arn}


def test_instance_stage_autoscales_and_alarms():
    resources = build_template(package_dict(), load_stage("prod"), default_bucket=DEFAULT_BUCKET)["Resources"]
    variant = resources["EndpointConfig"]["Properties"]["ProductionVariants"][0]
    assert (variant["InstanceType"], variant["InitialInstanceCount"]) == ("ml.m5.xlarge", 2)
    target = resources["ScalableTarget"]["Properties"]
    assert (target["MinCapacity"], target["MaxCapacity"]) == (2, 4)
    tracking = resources["ScalingPolicy"]["Properties"]["TargetTrackingScalingPolicyConfiguration"]
    assert tracking["PredefinedMetricSpecification"]["PredefinedMetricType"] == "SageMakerVariantInvocationsPerInstance"
    latency = resources["ModelLatencyAlarm"]["Properties"]
    assert (latency["MetricName"], latency["Threshold"]) == ("ModelLatency", 2_000_000)  # 2000 ms in microseconds
    assert resources["Invocation5XXErrorsAlarm"]["Properties"]["MetricName"] == "Invocation5XXErrors"


def test_serverless_stage_has_no_instances_capture_or_scaling():
    template = build_template(package_dict(), parse_stage(SERVERLESS), default_bucket=DEFAULT_BUCKET)
    resources = template["Resources"]
    variant = resources["EndpointConfig"]["Properties"]["ProductionVariants"][0]
    assert variant["ServerlessConfig"] == {"MemorySizeInMB": 3072, "MaxConcurrency": 2}
    assert "InstanceType" not in variant and "InitialInstanceCount" not in variant
    assert "DataCaptureConfig" not in resources["EndpointConfig"]["Properties"]
    assert "ScalableTarget" not in resources and "ScalingPolicy" not in resources
    assert {"Invocation5XXErrorsAlarm", "ModelLatencyAlarm"} <= set(resources)
    assert not any(statement["Sid"] == "WriteDataCapture" for statement in statements(template))
    assert "DataCaptureS3Uri" not in template["Outputs"]


def test_template_refuses_packages_it_cannot_host():
    package = package_dict()
    package["InferenceSpecification"]["Containers"][0]["Image"] = "docker.io/library/python:3.12"
    with pytest.raises(FlanopsError, match="not an Amazon ECR image URI"):
        build_template(package, load_stage("staging"), default_bucket=DEFAULT_BUCKET)
    with pytest.raises(FlanopsError, match="data capture needs a destination"):
        build_template(package_dict(), load_stage("staging"), default_bucket=None)


def test_stack_name_per_group_and_stage():
    assert stack_name("flanops", "prod") == "flanops-prod"
    assert stack_name("7b-models", "staging") == "flanops-7b-models-staging"  # stack names start with a letter
    with pytest.raises(FlanopsError, match="not a SageMaker group name"):
        stack_name("my_group", "prod")


# ---------------------------------------------------------------------------------------------
# moto: registry, approval, deploy, update, destroy
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[boto3.Session]:
    """An in-process mocked AWS with fake credentials; nothing from the developer's shell leaks in."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    with mock_aws():
        session = boto3.Session(region_name=REGION)
        session.client("s3").create_bucket(Bucket=BUCKET)
        session.client("sagemaker").create_model_package_group(ModelPackageGroupName=GROUP)
        yield session


def _create_package(session: boto3.Session, run: int, status: str = "PendingManualApproval") -> str:
    s3 = session.client("s3")
    key = f"{GROUP}/run-{run}/Evaluate/model/model.tar.gz"
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"model archive")
    return session.client("sagemaker").create_model_package(
        ModelPackageGroupName=GROUP, ModelApprovalStatus=status,
        CustomerMetadataProperties={"variant": "quantize"},
        InferenceSpecification={"Containers": [{"Image": IMAGE, "ModelDataUrl": f"s3://{BUCKET}/{key}"}],
                                "SupportedContentTypes": ["application/json"],
                                "SupportedResponseMIMETypes": ["application/json"]})["ModelPackageArn"]


def _served_package(session: boto3.Session, endpoint_name: str) -> str:
    """The model package behind an endpoint: endpoint → config → model → container."""
    sagemaker = session.client("sagemaker")
    config_name = sagemaker.describe_endpoint(EndpointName=endpoint_name)["EndpointConfigName"]
    model_name = sagemaker.describe_endpoint_config(EndpointConfigName=config_name)["ProductionVariants"][0]["ModelName"]
    return sagemaker.describe_model(ModelName=model_name)["PrimaryContainer"]["ModelPackageName"]


def _deploy(session, stage, arn, lines=None, **options):
    package = resolve_package(session, model_package_arn=arn, stage=stage)
    return deploy(session, stage, package, default_bucket=DEFAULT_BUCKET,
                  echo=(lines.append if lines is not None else lambda line: None), **options)


def test_approve_and_approval_refusals(aws):
    pending = _create_package(aws, 1)
    prod, staging = load_stage("prod"), load_stage("staging")
    with pytest.raises(FlanopsError) as caught:
        resolve_package(aws, model_package_arn=pending, stage=prod)
    assert "deploys Approved model packages only" in str(caught.value)
    assert f"flanops approve {pending}" in str(caught.value)
    assert resolve_package(aws, model_package_arn=pending, stage=staging)["ModelPackageArn"] == pending

    approved = approve(aws, pending, description="reviewed ROUGE-L and latency")
    assert approved["ModelApprovalStatus"] == "Approved"
    assert approved["ApprovalDescription"] == "reviewed ROUGE-L and latency"
    assert approved["CustomerMetadataProperties"] == {"variant": "quantize"}  # approval keeps the package's metadata
    assert resolve_package(aws, model_package_arn=pending, stage=prod)["ModelApprovalStatus"] == "Approved"

    unknown = pending.replace("/1", "/99")
    with pytest.raises(FlanopsError, match=f"model package {unknown}: .*not found"):
        approve(aws, unknown)
    rejected = _create_package(aws, 2, status="Rejected")
    with pytest.raises(FlanopsError, match="is Rejected; no stage deploys it"):
        resolve_package(aws, model_package_arn=rejected, stage=staging)
    with pytest.raises(FlanopsError, match="belongs to group flanops, not other"):
        resolve_package(aws, model_package_arn=pending, group="other", stage=staging)
    with pytest.raises(FlanopsError, match="give either a model package ARN or --latest-approved"):
        resolve_package(aws, stage=staging)


def test_latest_approved_picks_the_newest_approved_version(aws):
    with pytest.raises(FlanopsError, match="group flanops has no Approved version$"):
        resolve_package(aws, latest_approved=True, group=GROUP, stage=load_stage("prod"))
    first, second = _create_package(aws, 1, "Approved"), _create_package(aws, 2, "Approved")
    newest_pending = _create_package(aws, 3)
    picked = resolve_package(aws, latest_approved=True, group=GROUP, stage=load_stage("prod"))
    assert picked["ModelPackageArn"] == second != first
    approve(aws, newest_pending)
    assert resolve_package(aws, latest_approved=True, group=GROUP, stage=load_stage("prod"))["ModelPackageArn"] == newest_pending
    with pytest.raises(FlanopsError, match="model package group missing-group: .*flanops run registers"):
        resolve_package(aws, latest_approved=True, group="missing-group", stage=load_stage("prod"))


def test_latest_approved_names_the_pending_version_to_approve(aws):
    pending = _create_package(aws, 1)
    with pytest.raises(FlanopsError, match=f"newest pending one is {pending}: review it, then flanops approve {pending}"):
        resolve_package(aws, latest_approved=True, group=GROUP, stage=load_stage("prod"))


def test_deploy_creates_the_stack_and_endpoint(aws):
    arn = _create_package(aws, 1)  # pending: staging deploys what passed the quality gate
    lines: list[str] = []
    result = _deploy(aws, load_stage("staging"), arn, lines)

    assert (result.action, result.status, result.stack_name) == ("created", "CREATE_COMPLETE", "flanops-staging")
    outputs = result.outputs
    assert set(outputs) >= {"EndpointName", "EndpointConfigName", "ModelName", "RoleArn", "ModelPackageArn",
                            "DataCaptureS3Uri"}
    assert outputs["ModelPackageArn"] == arn
    assert outputs["DataCaptureS3Uri"] == f"s3://{DEFAULT_BUCKET}/{GROUP}/staging/data-capture"
    sagemaker = aws.client("sagemaker")
    endpoint = sagemaker.describe_endpoint(EndpointName=outputs["EndpointName"])
    assert endpoint["EndpointStatus"] == "InService"
    assert endpoint["EndpointConfigName"] == outputs["EndpointConfigName"]
    config = sagemaker.describe_endpoint_config(EndpointConfigName=outputs["EndpointConfigName"])
    variant = config["ProductionVariants"][0]
    assert (variant["InstanceType"], variant["InitialInstanceCount"], variant["ModelName"]) == (
        "ml.m5.large", 1, outputs["ModelName"])
    assert config["DataCaptureConfig"]["DestinationS3Uri"] == outputs["DataCaptureS3Uri"]
    assert _served_package(aws, outputs["EndpointName"]) == arn
    role_name = outputs["RoleArn"].rpartition("/")[2]
    assert aws.client("iam").get_role(RoleName=role_name)["Role"]["Arn"] == outputs["RoleArn"]
    tags = {t["Key"]: t["Value"] for t in sagemaker.list_tags(ResourceArn=endpoint["EndpointArn"])["Tags"]}
    assert tags["flanops:stage"] == "staging" and tags["flanops:model-package-group"] == GROUP
    assert any(line.startswith("creating stack flanops-staging") for line in lines)
    assert any("Add Endpoint (AWS::SageMaker::Endpoint)" in line for line in lines)


def test_redeploying_the_same_package_is_already_deployed(aws):
    arn = _create_package(aws, 1)
    first = _deploy(aws, load_stage("staging"), arn)
    lines: list[str] = []
    again = _deploy(aws, load_stage("staging"), arn, lines)
    assert (again.action, again.outputs["EndpointName"]) == ("unchanged", first.outputs["EndpointName"])
    assert any("nothing to change" in line for line in lines)
    # The change set that found nothing to change is deleted, not left behind as FAILED.
    summaries = aws.client("cloudformation").list_change_sets(StackName=first.stack_id)["Summaries"]
    assert [summary["Status"] for summary in summaries if summary["Status"] == "FAILED"] == []


def test_update_to_a_new_version_changes_the_endpoints_model(aws):
    stage = load_stage("staging")
    first = _deploy(aws, stage, _create_package(aws, 1))
    second_arn = _create_package(aws, 2)
    second = _deploy(aws, stage, second_arn)
    assert second.action == "updated" and second.status == "UPDATE_COMPLETE"
    assert second.outputs["EndpointName"] == first.outputs["EndpointName"]  # same endpoint, new model behind it
    assert second.outputs["EndpointConfigName"] != first.outputs["EndpointConfigName"]
    assert _served_package(aws, second.outputs["EndpointName"]) == second_arn


def test_lint_errors_stop_deploy_before_anything_is_created(aws):
    arn = _create_package(aws, 1)
    typo = parse_stage({"name": "staging", "require_approval": False, "instance_type": "ml.m5.huge"}, source="typo.json")
    with pytest.raises(FlanopsError, match=r"typo.json\): cfn-lint rejects the endpoint template, nothing was deployed"):
        _deploy(aws, typo, arn)
    assert aws.client("cloudformation").list_stacks()["StackSummaries"] == []


def test_failed_update_keeps_the_old_endpoint_serving(aws):
    stage = load_stage("staging")
    arn = _create_package(aws, 1)
    before = _deploy(aws, stage, arn)
    # An instance type SageMaker rejects, past the linter: the EndpointConfig fails in CloudFormation.
    broken = parse_stage({**stage.model_dump(exclude_none=True), "instance_type": "ml.m5.huge"}, source="broken.json")
    with pytest.raises(FlanopsError) as caught:
        _deploy(aws, broken, arn, lint=False)
    message = str(caught.value)
    assert message.startswith("updating stack flanops-staging failed: ")
    assert f"endpoint {before.outputs['EndpointName']} keeps serving {arn}" in message
    endpoint = aws.client("sagemaker").describe_endpoint(EndpointName=before.outputs["EndpointName"])
    assert endpoint["EndpointStatus"] == "InService"
    assert endpoint["EndpointConfigName"] == before.outputs["EndpointConfigName"]


def test_dry_run_writes_the_template_and_creates_nothing(aws, tmp_path: Path):
    stage = load_stage("prod")
    package = approve(aws, _create_package(aws, 1))
    lines: list[str] = []
    path = dry_run(stage, package, default_bucket=DEFAULT_BUCKET, out=tmp_path / "out" / "template.json",
                   echo=lines.append)
    template = json.loads(path.read_text())
    assert template == build_template(package, stage, default_bucket=DEFAULT_BUCKET)
    assert "stack flanops-prod" in lines[0] and "cfn-lint: clean" in lines[0]
    assert aws.client("cloudformation").list_stacks()["StackSummaries"] == []
    assert aws.client("sagemaker").list_endpoints()["Endpoints"] == []


def test_destroy_removes_the_stack_and_says_when_there_is_none(aws):
    result = _deploy(aws, load_stage("staging"), _create_package(aws, 1))
    lines: list[str] = []
    assert destroy(aws, "staging", GROUP, echo=lines.append) == "flanops-staging"
    assert aws.client("sagemaker").list_endpoints()["Endpoints"] == []
    stack = aws.client("cloudformation").describe_stacks(StackName=result.stack_id)["Stacks"][0]
    assert stack["StackStatus"] == "DELETE_COMPLETE"
    assert lines[-1] == "stack flanops-staging: DELETE_COMPLETE"
    with pytest.raises(FlanopsError, match=r"no stack flanops-staging \(model package group flanops, stage staging\) "
                                           r"in region us-east-1: nothing to destroy"):
        destroy(aws, "staging", GROUP)


def test_deploy_replaces_a_stack_left_empty_by_an_earlier_attempt(aws):
    cfn = aws.client("cloudformation")
    cfn.create_change_set(StackName="flanops-staging", ChangeSetName="abandoned", ChangeSetType="CREATE",
                          TemplateBody=json.dumps({"Resources": {}}))
    assert cfn.describe_stacks(StackName="flanops-staging")["Stacks"][0]["StackStatus"] == "REVIEW_IN_PROGRESS"
    lines: list[str] = []
    result = _deploy(aws, load_stage("staging"), _create_package(aws, 1), lines)
    assert result.action == "created" and result.status == "CREATE_COMPLETE"
    assert any("removing stack flanops-staging, left REVIEW_IN_PROGRESS" in line for line in lines)


def test_deploy_itself_refuses_an_unapproved_package_for_prod(aws):
    package = resolve_package(aws, model_package_arn=_create_package(aws, 1), stage=load_stage("staging"))
    with pytest.raises(FlanopsError, match="stage prod deploys Approved model packages only"):
        deploy(aws, load_stage("prod"), package, default_bucket=DEFAULT_BUCKET, echo=lambda line: None)
    assert aws.client("cloudformation").list_stacks()["StackSummaries"] == []


# ---------------------------------------------------------------------------------------------
# Real CloudFormation's rollback (stubbed: moto cannot roll back)
# ---------------------------------------------------------------------------------------------

class _Session:
    """What deploy() uses of a boto3 Session, handing out one stubbed client."""

    region_name = REGION

    def __init__(self, cloudformation):
        self._cloudformation = cloudformation

    def client(self, service: str):
        assert service == "cloudformation", service
        return self._cloudformation


def _event(number: int, logical_id: str, resource_type: str, status: str, reason: str | None = None) -> dict:
    event = {"StackId": STACK_ID, "EventId": f"event-{number}", "StackName": "flanops-prod",
             "LogicalResourceId": logical_id, "ResourceType": resource_type, "ResourceStatus": status,
             "Timestamp": dt.datetime(2025, 1, 1, 12, 0, number, tzinfo=dt.timezone.utc)}
    if reason:
        event["ResourceStatusReason"] = reason
    return event


STACK_ID = "arn:aws:cloudformation:us-east-1:123456789012:stack/flanops-prod/0a1b2c3d"


def test_rolled_back_update_reports_the_failed_resource_and_what_still_serves(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    cfn = boto3.client("cloudformation", region_name=REGION)
    old, new = package_dict(1), package_dict(2)
    previous = {"StackName": "flanops-prod", "StackId": STACK_ID, "StackStatus": "UPDATE_COMPLETE",
                "CreationTime": dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc),
                "Outputs": [{"OutputKey": "EndpointName", "OutputValue": "Endpoint-old"},
                            {"OutputKey": "ModelPackageArn", "OutputValue": old["ModelPackageArn"]}]}
    change_set_id = "arn:aws:cloudformation:us-east-1:123456789012:changeSet/flanops-x/1"
    quota = "ResourceLimitExceeded: The account-level service limit 'ml.m5.xlarge for endpoint usage' is 2 Instances"
    earlier = [_event(1, "flanops-prod", "AWS::CloudFormation::Stack", "UPDATE_COMPLETE")]
    during = [_event(9, "flanops-prod", "AWS::CloudFormation::Stack", "UPDATE_ROLLBACK_COMPLETE"),
              _event(8, "Endpoint", "AWS::SageMaker::Endpoint", "UPDATE_FAILED", "Resource update cancelled"),
              _event(7, "EndpointConfig", "AWS::SageMaker::EndpointConfig", "UPDATE_FAILED", quota),
              _event(6, "Model", "AWS::SageMaker::Model", "UPDATE_COMPLETE"),
              _event(5, "flanops-prod", "AWS::CloudFormation::Stack", "UPDATE_IN_PROGRESS", "User Initiated")]
    with Stubber(cfn) as stub:
        stub.add_response("describe_stacks", {"Stacks": [previous]}, {"StackName": "flanops-prod"})
        stub.add_response("create_change_set", {"Id": change_set_id, "StackId": STACK_ID})
        stub.add_response("describe_change_set", {
            "ChangeSetId": change_set_id, "StackId": STACK_ID, "Status": "CREATE_COMPLETE",
            "ExecutionStatus": "AVAILABLE", "Changes": [{"Type": "Resource", "ResourceChange": {
                "Action": "Modify", "LogicalResourceId": "Model", "ResourceType": "AWS::SageMaker::Model",
                "Replacement": "True"}}]})
        stub.add_response("describe_stack_events", {"StackEvents": earlier})
        stub.add_response("execute_change_set", {}, {"ChangeSetName": change_set_id})
        stub.add_response("describe_stacks", {"Stacks": [{**previous, "StackStatus": "UPDATE_ROLLBACK_COMPLETE"}]})
        stub.add_response("describe_stack_events", {"StackEvents": during + earlier})
        stub.add_response("describe_stack_events", {"StackEvents": during + earlier})
        lines: list[str] = []
        with pytest.raises(FlanopsError) as caught:
            deploy(_Session(cfn), load_stage("prod"), new, default_bucket=DEFAULT_BUCKET, echo=lines.append,
                   lint=False, poll_seconds=0)
        stub.assert_no_pending_responses()
    assert str(caught.value) == (
        f"updating stack flanops-prod failed: EndpointConfig (AWS::SageMaker::EndpointConfig): {quota}. "
        f"The stack rolled back: endpoint Endpoint-old keeps serving {old['ModelPackageArn']}")
    assert "  Modify Model (AWS::SageMaker::Model) (replacement)" in lines
    assert f"  EndpointConfig UPDATE_FAILED: {quota}" in lines
    assert lines.index("  Model UPDATE_COMPLETE") < lines.index("  flanops-prod UPDATE_ROLLBACK_COMPLETE")
