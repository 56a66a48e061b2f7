"""Security (issue 9): least-privilege roles, KMS, locked-down buckets, VPC and network isolation, linted templates.

Everything runs in one moto ``mock_aws`` for the module (in process; nested mocks would share its
state anyway), so each test uses buckets and regions of its own. The pipeline definition with
every security setting on is built once (about 8 s) and goes through the same botocore shape
check as the default one in test_pipeline_definition.py.
"""
from __future__ import annotations

import fnmatch
import functools
import json
import re
from types import SimpleNamespace

import boto3
import botocore.session
import pytest
from botocore.exceptions import ClientError
from test_pipeline_definition import OPERATIONS, request_problems

from conftest import mocked_aws
from flanops.pipelines import cli, targets
from flanops.pipelines.config import ConfigError, config_dir, load_config
from flanops.pipelines.code_locations import iter_steps
from flanops.pipelines.definition import NAMES, build_definition
from flanops.pipelines.errors import FlanopsError
from flanops.infra.buckets import PUBLIC_ACCESS_BLOCK, ensure_bucket, lock_down
from flanops.infra.pipeline_role import pipeline_policy, pipeline_role_template, policy_name, resolve_pseudo
from flanops.infra.stages import StageConfigError, load_stage, parse_stage, shipped_stages
from flanops.infra.template import build_template, lint_template
from flanops.pipelines.local import LocalExecutor

# moto's CloudFormation parses only some resource types; the others are skipped with this warning.
pytestmark = pytest.mark.filterwarnings("ignore:Tried to parse AWS::")

REGION = "us-east-1"
ACCOUNT = "123456789012"   # moto's account
BUCKET = "flanops-security-test"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/flanops-test"
KMS_KEY = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
SUBNETS = ["subnet-0123456789abcdef0", "subnet-89abcdef"]
SECURITY_GROUPS = ["sg-0123456789abcdef0"]
PSEUDO = {"AWS::Partition": "aws", "AWS::Region": REGION, "AWS::AccountId": ACCOUNT}
SECURE_CONFIG = f"""\
pipeline_name: flanops-secure
parameters: {{ModelPackageGroupName: Flanops-Secure}}
steps:
  prepare: {{train_size: 40, validation_size: 5, test_size: 5}}
security:
  kms_key_id: {KMS_KEY}
  vpc: {{subnets: {json.dumps(SUBNETS)}, security_group_ids: {json.dumps(SECURITY_GROUPS)}}}
  network_isolation: true
  encrypt_inter_container_traffic: true
"""
SECURE_STAGE = {"name": "secure", "instance_type": "ml.m5.large", "kms_key_id": "alias/endpoints",
                "network_isolation": True, "vpc": {"subnets": SUBNETS, "security_group_ids": SECURITY_GROUPS}}
SERVERLESS_STAGE = {"name": "dev", "require_approval": False, "data_capture": {"enabled": False},
                    "serverless": {"memory_size_mb": 2048, "max_concurrency": 2}}
# Actions that AWS lets a policy grant on "*" only (no resource-level permissions); nothing else may be.
STAR_ONLY = {"ecr:GetAuthorizationToken", "ec2:DescribeDhcpOptions", "ec2:DescribeNetworkInterfaces",
             "ec2:DescribeSecurityGroups", "ec2:DescribeSubnets", "ec2:DescribeVpcs"}
# cloudsplaining findings that are accepted, and why.
ACCEPTED_RISKS = {
    # Every role that pulls from ECR needs it, and it takes no resource; the token only lets the
    # role use the repositories the PullImages statement names.
    "ecr:GetAuthorizationToken": "credentials_exposure",
}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def aws():
    """In-process mocked AWS with the test bucket (conftest.mocked_aws)."""
    with mocked_aws(REGION, BUCKET) as session:
        yield session


@pytest.fixture(scope="module")
def secure_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "secure.yaml"
    path.write_text(SECURE_CONFIG, encoding="utf-8")
    return load_config(path)


@pytest.fixture(scope="module")
def secure_definition(aws, secure_config) -> dict:
    return json.loads(build_definition(secure_config, ROLE_ARN, BUCKET, aws))


@pytest.fixture(scope="module")
def secure_steps(secure_definition) -> dict[str, dict]:
    return {step["Name"]: step for step in iter_steps(secure_definition["Steps"])}


@pytest.fixture(scope="module")
def templates(aws, secure_config) -> dict[str, dict]:
    """Every kind of template flanops writes: each shipped stage, serverless, a stage with KMS + VPC +
    isolation, and the pipeline role (default bucket; the secure config with its own bucket and S3 data)."""
    package = package_description()
    stages = {name: load_stage(name) for name in shipped_stages()}
    stages |= {"serverless": parse_stage(SERVERLESS_STAGE), "kms-vpc-isolation": parse_stage(SECURE_STAGE)}
    found = {f"stage {name}": build_template(package, stage, default_bucket=BUCKET) for name, stage in stages.items()}
    found["pipeline role (quick)"] = pipeline_role_template(load_config(), region=REGION)
    found["pipeline role (kms, vpc, bucket)"] = pipeline_role_template(secure_config, region=REGION, bucket=BUCKET)
    found["pipeline role (S3 data)"] = pipeline_role_template(
        load_config(None, ["InputDataUri=s3://dialogue-data/dialogsum/"]), region=REGION, bucket=BUCKET)
    return found


EMBEDDED_REGION = "eu-central-1"   # a region no other test's buckets are in


@pytest.fixture
def fake_embedded_aws(aws, monkeypatch):
    """open_target's embedded AWS, as the module's moto (no server)."""
    session = boto3.Session(region_name=EMBEDDED_REGION)
    monkeypatch.setattr("flanops.pipelines.targets.ensure_server", lambda: SimpleNamespace(
        activate=lambda: None, boto_session=lambda: session, environment=lambda: {}))
    return session


# ----------------------------------------------------------------------------- helpers
def package_description() -> dict:
    """A describe_model_package response for a package in this region's Hugging Face inference image."""
    image = ("763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-pytorch-inference:"
             "2.6.0-transformers4.51.3-cpu-py312-ubuntu22.04")
    return {"ModelPackageArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package/flanops/1",
            "ModelPackageGroupName": "flanops", "ModelPackageVersion": 1, "ModelApprovalStatus": "Approved",
            "InferenceSpecification": {"Containers": [
                {"Image": image, "ModelDataUrl": f"s3://{BUCKET}/flanops/run-1/Evaluate/model/model.tar.gz"}]}}


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def resolved(value):
    """A template fragment as CloudFormation resolves it in the test account (GetAtt: a role named after it)."""
    if isinstance(value, list):
        return [resolved(item) for item in value]
    if isinstance(value, dict):
        if set(value) == {"Fn::GetAtt"}:
            return f"arn:aws:iam::{ACCOUNT}:role/{value['Fn::GetAtt'][0]}"
        return resolve_pseudo({key: resolved(item) for key, item in value.items()}, PSEUDO)
    return value


def role_policies(template: dict) -> dict[str, dict]:
    """Every IAM policy document in a template, resolved, by where it is."""
    found = {}
    for logical_id, resource in template["Resources"].items():
        properties = resource["Properties"]
        if resource["Type"] == "AWS::IAM::Role":
            for policy in properties.get("Policies", []):
                found[f"{logical_id}/{policy['PolicyName']}"] = resolved(policy["PolicyDocument"])
        elif resource["Type"] == "AWS::IAM::RolePolicy":
            found[logical_id] = resolved(properties["PolicyDocument"])
    return found


def by_sid(policy: dict) -> dict[str, dict]:
    return {statement["Sid"]: statement for statement in policy["Statement"]}


def globs_overlap(a: str, b: str) -> bool:
    """True when some string matches both glob patterns (``*`` only)."""
    @functools.lru_cache(maxsize=None)
    def match(i: int, j: int) -> bool:
        if i == len(a) and j == len(b):
            return True
        if i < len(a) and a[i] == "*" and (match(i + 1, j) or (j < len(b) and match(i, j + 1))):
            return True
        if j < len(b) and b[j] == "*" and (match(i, j + 1) or (i < len(a) and match(i + 1, j))):
            return True
        return i < len(a) and j < len(b) and a[i] == b[j] != "*" and match(i + 1, j + 1)

    return match(0, 0)


def iam_problems(policy: dict) -> list[str]:
    """What IAM's own action catalog (policy_sentry's, offline) says about a policy.

    Each action must exist; a statement's resources must each fit one of its actions' resource
    types and each action must have a resource it can use; "*" only for actions that take nothing else.
    """
    from policy_sentry.querying.actions import get_action_data

    problems = []
    for statement in policy["Statement"]:
        resources = as_list(statement["Resource"])
        formats = {}
        for action in as_list(statement["Action"]):
            service, name = action.split(":")
            data = get_action_data(service, name)
            if not data or not data.get(service):
                problems.append(f"{statement['Sid']}: {action} is not an IAM action")
                continue
            formats[action] = [entry["resource_arn_format"] for entry in data[service]]
        for action, arn_formats in formats.items():
            patterns = [re_glob(arn_format) for arn_format in arn_formats if arn_format != "*"]
            if resources == ["*"]:
                if patterns:
                    problems.append(f"{statement['Sid']}: {action} has resource-level permissions, yet '*'")
            elif not any(globs_overlap(resource, pattern) for resource in resources for pattern in patterns):
                problems.append(f"{statement['Sid']}: no resource fits {action} ({arn_formats})")
        if resources != ["*"]:
            every_pattern = [re_glob(f) for arn_formats in formats.values() for f in arn_formats if f != "*"]
            for resource in resources:
                if not any(globs_overlap(resource, pattern) for pattern in every_pattern):
                    problems.append(f"{statement['Sid']}: {resource} fits none of its actions")
    return problems


def re_glob(arn_format: str) -> str:
    """``arn:${Partition}:s3:::${BucketName}/${ObjectName}`` → ``arn:*:s3:::*/*``."""
    return re.sub(r"\$\{[^}]+\}", "*", arn_format)


def risky_actions(policy: dict) -> dict[str, set[str]]:
    """cloudsplaining's findings (privilege escalation, exfiltration, unconstrained writes, …): kind → actions."""
    from cloudsplaining.scan.policy_document import PolicyDocument

    document = PolicyDocument(policy)
    findings = {
        "privilege_escalation": {a for finding in document.allows_privilege_escalation for a in finding["actions"]},
        "data_exfiltration": set(document.allows_data_exfiltration_actions),
        "permissions_management": set(document.permissions_management_without_constraints),
        "write_without_constraints": set(document.write_actions_without_constraints),
        "credentials_exposure": set(document.credentials_exposure),
        "infrastructure_modification": set(document.infrastructure_modification),
    }
    return {kind: actions for kind, actions in findings.items() if actions}


def s3_uris_in(value) -> list[str]:
    """Every S3 location a definition names: literal URIs and ``Std:Join`` ones (variables as ``*``)."""
    if isinstance(value, str):
        return [value] if value.startswith("s3://") else []
    if isinstance(value, list):
        return [uri for item in value for uri in s3_uris_in(item)]
    if isinstance(value, dict):
        join = value.get("Std:Join")
        if join and join["Values"] and join["Values"][0] in ("s3:/", "s3://"):
            parts = [part if isinstance(part, str) else "*" for part in join["Values"]]
            return [join["On"].join(parts).replace("s3:///", "s3://")]
        return [uri for item in value.values() for uri in s3_uris_in(item)]
    return []


def bucket_settings(s3, bucket: str) -> dict:
    """What S3 says about a bucket's public access block, policy and default encryption (or the error code)."""
    def read(call, key):
        try:
            return call(Bucket=bucket)[key]
        except ClientError as err:
            return err.response["Error"]["Code"]
    return {"public_access_block": read(s3.get_public_access_block, "PublicAccessBlockConfiguration"),
            "policy": read(s3.get_bucket_policy, "Policy"),
            "encryption": read(s3.get_bucket_encryption, "ServerSideEncryptionConfiguration")}


def assert_locked_down(settings: dict, algorithm: str, kms_key: str | None = None) -> None:
    assert settings["public_access_block"] == PUBLIC_ACCESS_BLOCK
    statement = json.loads(settings["policy"])["Statement"][0]
    assert statement["Effect"] == "Deny" and statement["Action"] == "s3:*" and statement["Principal"] == "*"
    assert statement["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    default = settings["encryption"]["Rules"][0]["ApplyServerSideEncryptionByDefault"]
    assert default["SSEAlgorithm"] == algorithm
    assert default.get("KMSMasterKeyID") == kms_key


# ----------------------------------------------------------------------------- definition: KMS, VPC, isolation
def test_secure_definition_is_a_valid_request_of_each_api(secure_steps):
    model = botocore.session.get_session().get_service_model("sagemaker")
    checked = [name for name, step in secure_steps.items() if step["Type"] in OPERATIONS]
    assert len(checked) == 8   # 6 processing jobs, the training job, the model package
    problems = {name: request_problems(secure_steps[name], model) for name in checked}
    assert not any(problems.values()), "\n".join(f"{n}:\n{p}" for n, p in problems.items() if p)


def test_every_job_is_encrypted_and_isolated_in_the_vpc(secure_steps, reliability):
    vpc = {"Subnets": SUBNETS, "SecurityGroupIds": SECURITY_GROUPS}
    processing = [step["Arguments"] for step in secure_steps.values() if step["Type"] == "Processing"]
    assert len(processing) == 6
    for arguments in processing:
        assert arguments["ProcessingOutputConfig"]["KmsKeyId"] == KMS_KEY
        assert arguments["ProcessingResources"]["ClusterConfig"]["VolumeKmsKeyId"] == KMS_KEY
        assert arguments["NetworkConfig"] == {"VpcConfig": vpc, "EnableNetworkIsolation": True,
                                              "EnableInterContainerTrafficEncryption": True}
    training = secure_steps[NAMES.finetune]["Arguments"]
    assert training["OutputDataConfig"]["KmsKeyId"] == KMS_KEY
    assert training["ResourceConfig"]["VolumeKmsKeyId"] == KMS_KEY
    assert training["VpcConfig"] == vpc
    assert training["EnableNetworkIsolation"] is True and training["EnableInterContainerTrafficEncryption"] is True
    reliability.record("security.kms", f"definition: KmsKeyId on the outputs and VolumeKmsKeyId on the volumes of "
                       f"all {len(processing)} processing jobs, OutputDataConfig.KmsKeyId and ResourceConfig."
                       "VolumeKmsKeyId on the training job; botocore accepts every job's arguments")
    reliability.record("security.network", f"definition: NetworkConfig (VpcConfig with {len(SUBNETS)} subnets, "
                       f"EnableNetworkIsolation, EnableInterContainerTrafficEncryption) on all {len(processing)} "
                       "processing jobs; VpcConfig + both flags on the training job; botocore accepts them")


def test_local_executor_runs_a_secure_job_and_encrypts_its_outputs(aws, secure_definition, secure_config, tmp_path,
                                                                   reliability):
    """A job with KmsKeyId, VpcConfig and isolation runs here (VPC does not apply to a subprocess); its
    outputs land in S3 encrypted with the job's key, as SageMaker would write them."""
    step = next(s for s in secure_definition["Steps"] if s["Name"] == NAMES.prepare)
    alone = {**secure_definition, "Steps": [{**step, "CacheConfig": {"Enabled": False}}]}
    lines: list[str] = []
    executor = LocalExecutor(aws, secure_config.pipeline_name, alone, tmp_path / "home", tmp_path / "run",
                             echo=lines.append)
    arn = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:pipeline/{secure_config.pipeline_name}/execution/secure1"
    record = executor.start(secure_config.parameter_values(), arn)
    assert record["PipelineExecutionStatus"] == "Succeeded", (record.get("FailureReason"), lines)
    s3 = aws.client("s3")
    keys = [obj["Key"] for obj in s3.list_objects_v2(
        Bucket=BUCKET, Prefix=f"{secure_config.pipeline_name}/secure1/{NAMES.prepare}/")["Contents"]]
    assert any(key.endswith("train.jsonl") for key in keys)
    heads = [s3.head_object(Bucket=BUCKET, Key=key) for key in keys]
    assert all(head["ServerSideEncryption"] == "aws:kms" and head["SSEKMSKeyId"] == KMS_KEY for head in heads)
    reliability.record("security.kms", f"local executor: the job ran; its {len(keys)} output objects are stored "
                       "with ServerSideEncryption aws:kms and the configured SSEKMSKeyId")


def test_bad_security_settings_are_refused_with_what_to_change(tmp_path, reliability):
    def refusal(security_yaml: str, params: list[str] | None = None) -> str:
        path = tmp_path / "config.yaml"
        path.write_text(security_yaml, encoding="utf-8")
        with pytest.raises(ConfigError) as caught:
            load_config(path, params)
        return str(caught.value)

    message = refusal("security: {vpc: {subnets: [subnet-12], security_group_ids: [sg-0123456789abcdef0]}}")
    assert "security.vpc.subnets.0: expected a subnet id such as subnet-0123456789abcdef0" in message
    message = refusal("security: {vpc: {subnets: [subnet-89abcdef], security_group_ids: [default]}}")
    assert "security.vpc.security_group_ids.0: expected a security group id such as sg-" in message
    message = refusal("security: {kms_key_id: my-key}")
    assert "security.kms_key_id: expected a KMS key id, key ARN, alias/NAME or alias ARN (given 'my-key')" in message
    message = refusal("security: {vpc: {subnets: [], security_group_ids: [sg-89abcdef]}}")
    assert "security.vpc.subnets" in message and "at least 1" in message
    message = refusal("security: {kms_key: alias/x}")
    assert "security.kms_key: Extra inputs are not permitted" in message
    message = refusal("security: {network_isolation: true}", ["InputDataUri=s3://bucket/data/"])
    assert "network_isolation" in message and "InputDataUri 's3://bucket/data/'" in message
    assert "turn network_isolation off" in message

    with pytest.raises(StageConfigError) as caught:
        parse_stage({**SECURE_STAGE, "vpc": {"subnets": ["subnet-nothex00"], "security_group_ids": SECURITY_GROUPS}})
    assert "vpc.subnets.0: expected a subnet id such as subnet-0123456789abcdef0 (given 'subnet-nothex00')" in str(
        caught.value)
    with pytest.raises(StageConfigError, match="serverless endpoints support neither a VPC nor network isolation"):
        parse_stage({**SERVERLESS_STAGE, "network_isolation": True})
    reliability.record("security.network", "bad settings refused before anything runs, naming the field: subnet "
                       "and security group ids, KMS key, empty subnet list, unknown key, network isolation with "
                       "S3 data, VPC on a serverless stage")


def test_the_commented_security_example_in_cloud_yaml_loads(tmp_path):
    text = (config_dir() / "cloud.yaml").read_text(encoding="utf-8")
    head, example = text.split("# security:\n")
    lines = ["security:"] + [line.removeprefix("# ") for line in example.splitlines() if line.startswith("#   ")]
    path = tmp_path / "cloud-secure.yaml"
    path.write_text(head + "\n".join(lines) + "\n", encoding="utf-8")
    security = load_config(path).security
    assert security.kms_key_id == "alias/flanops" and security.vpc.subnets == ["subnet-0123456789abcdef0"]
    assert security.encrypt_inter_container_traffic and not security.network_isolation


# ----------------------------------------------------------------------------- IAM
def test_pipeline_role_allows_only_what_the_pipeline_does(aws, secure_config, secure_definition, reliability):
    policy = resolved(pipeline_policy(secure_config, region=REGION, bucket=BUCKET, role_arn=ROLE_ARN))
    statements = by_sid(policy)
    name = secure_config.pipeline_name
    actions = [action for statement in policy["Statement"] for action in as_list(statement["Action"])]
    assert not any(action == "*" or action.endswith(":*") for action in actions)
    star = {action for statement in policy["Statement"] if statement["Resource"] == "*"
            for action in as_list(statement["Action"])}
    assert star <= STAR_ONLY, star - STAR_ONLY
    assert iam_problems(policy) == []

    # S3: the pipeline's prefix only, and it covers every location the definition reads or writes
    s3_objects = [resource for statement in policy["Statement"] for resource in as_list(statement["Resource"])
                  if resource.startswith("arn:aws:s3:::") and "/" in resource]
    assert s3_objects == [f"arn:aws:s3:::{BUCKET}/{name}/*"]
    assert statements["ListPipelineData"]["Condition"] == {"StringLike": {"s3:prefix": [name, f"{name}/*"]}}
    uris = s3_uris_in(secure_definition)
    assert len(uris) > 20
    for uri in uris:
        assert fnmatch.fnmatchcase("arn:aws:s3:::" + uri.removeprefix("s3://").rstrip("/"), s3_objects[0]), uri

    # SageMaker: the pipeline's jobs and its model package group
    assert statements["RunPipelineJobs"]["Resource"] == [
        f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:processing-job/pipelines-*",
        f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/pipelines-*"]
    assert sorted(statements["RegisterModelPackages"]["Resource"]) == sorted(
        f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:{kind}" for group in ("Flanops-Secure", "flanops-secure")
        for kind in (f"model-package-group/{group}", f"model-package/{group}/*"))
    sagemaker_actions = {a for a in actions if a.startswith("sagemaker:")}
    assert sagemaker_actions == {"sagemaker:AddTags", "sagemaker:CreateProcessingJob", "sagemaker:CreateTrainingJob",
                                 "sagemaker:DescribeProcessingJob", "sagemaker:DescribeTrainingJob",
                                 "sagemaker:StopProcessingJob", "sagemaker:StopTrainingJob",
                                 "sagemaker:CreateModelPackage", "sagemaker:CreateModelPackageGroup",
                                 "sagemaker:DescribeModelPackage", "sagemaker:DescribeModelPackageGroup"}
    # logs: the jobs' log groups; ECR: exactly the repositories of the definition's images
    assert all(":log-group:/aws/sagemaker/ProcessingJobs" in r or ":log-group:/aws/sagemaker/TrainingJobs" in r
               for r in statements["WriteJobLogs"]["Resource"])
    images = {step["Arguments"]["AppSpecification"]["ImageUri"] if step["Type"] == "Processing"
              else step["Arguments"]["AlgorithmSpecification"]["TrainingImage"]
              for step in iter_steps(secure_definition["Steps"]) if step["Type"] in ("Processing", "Training")}
    assert len(images) == 2
    assert sorted(statements["PullJobImages"]["Resource"]) == sorted(
        {f"arn:aws:ecr:{REGION}:{image.split('.')[0]}:repository/{image.split('/', 1)[1].split(':')[0]}"
         for image in images})
    # iam:PassRole: itself, to SageMaker
    assert statements["PassThisRoleToJobs"]["Resource"] == ROLE_ARN
    assert statements["PassThisRoleToJobs"]["Condition"] == {
        "StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}
    # KMS: the configured key, grants only for AWS resources; EC2: the configured subnets and groups
    assert statements["UseKmsKey"]["Resource"] == statements["GrantKmsKeyToJobVolumes"]["Resource"] == KMS_KEY
    assert statements["GrantKmsKeyToJobVolumes"]["Condition"] == {"Bool": {"kms:GrantIsForAWSResource": "true"}}
    assert sorted(statements["CreateNetworkInterfacesInVpc"]["Resource"]) == sorted(
        [f"arn:aws:ec2:{REGION}:{ACCOUNT}:network-interface/*"]
        + [f"arn:aws:ec2:{REGION}:{ACCOUNT}:subnet/{subnet}" for subnet in SUBNETS]
        + [f"arn:aws:ec2:{REGION}:{ACCOUNT}:security-group/{group}" for group in SECURITY_GROUPS])
    reliability.record(
        "security.iam",
        f"pipeline role: {len(policy['Statement'])} statements, {len(set(actions))} actions, no '*' action; "
        f"'*' resource only for {sorted(star)} (IAM offers no resource-level permission for them, checked "
        f"against IAM's action catalog); S3 only s3://<bucket>/{name}/*, covering all {len(uris)} S3 locations "
        "in the definition; jobs pipelines-*, the model package group, the jobs' two log groups, the two "
        "images' repositories, PassRole on itself to sagemaker.amazonaws.com, the KMS key, the VPC's subnets")


def test_pipeline_role_reads_input_data_on_s3_and_nothing_more(aws):
    policy = resolved(pipeline_policy(load_config(None, ["InputDataUri=s3://dialogue-data/dialogsum/"]),
                                      region=REGION, bucket=BUCKET, role_arn=ROLE_ARN))
    statements = by_sid(policy)
    assert statements["ReadInputData"]["Action"] == ["s3:GetObject"]
    assert statements["ReadInputData"]["Resource"] == ["arn:aws:s3:::dialogue-data/dialogsum",
                                                       "arn:aws:s3:::dialogue-data/dialogsum/*"]
    assert statements["ListInputData"]["Condition"] == {
        "StringLike": {"s3:prefix": ["dialogsum", "dialogsum/*"]}}
    assert statements["LocateBuckets"]["Resource"] == [f"arn:aws:s3:::{BUCKET}", "arn:aws:s3:::dialogue-data"]
    assert iam_problems(policy) == []
    quick = by_sid(resolved(pipeline_policy(load_config(), region=REGION, bucket=BUCKET, role_arn=ROLE_ARN)))
    assert "ReadInputData" not in quick and "UseKmsKey" not in quick and "DescribeVpc" not in quick


def test_iam_check_catches_wrong_actions_resources_and_stars():
    """The catalog check above is not vacuous: a misspelled action, a resource of the wrong type, a needless '*'."""
    policy = {"Statement": [
        {"Sid": "Typo", "Action": ["sagemaker:CreateProcesingJob"], "Resource": "arn:aws:sagemaker:x:1:processing-job/a"},
        {"Sid": "Mismatch", "Action": ["s3:GetObject"], "Resource": ["arn:aws:sagemaker:us-east-1:1:training-job/a"]},
        {"Sid": "Star", "Action": ["s3:PutObject"], "Resource": "*"}]}
    problems = iam_problems(policy)
    assert any(p.startswith("Typo: sagemaker:CreateProcesingJob is not an IAM action") for p in problems)
    assert any(p.startswith("Mismatch: no resource fits s3:GetObject") for p in problems)
    assert "Star: s3:PutObject has resource-level permissions, yet '*'" in problems


def test_embedded_role_gets_the_pipeline_policy_and_a_locked_down_bucket(fake_embedded_aws, reliability):
    config = load_config()
    target = targets.open_target(SimpleNamespace(aws=False), config)
    iam, s3 = fake_embedded_aws.client("iam"), fake_embedded_aws.client("s3")
    stored = iam.get_role_policy(RoleName=targets.ROLE_NAME, PolicyName=policy_name(config))["PolicyDocument"]
    statements = by_sid(stored)
    assert "Fn::" not in json.dumps(stored) and "AWS::" not in json.dumps(stored)
    assert statements["ReadWritePipelineData"]["Resource"] == [f"arn:aws:s3:::{target.bucket}/{config.pipeline_name}/*"]
    assert statements["PassThisRoleToJobs"]["Resource"] == target.role_arn
    assert target.bucket == f"sagemaker-{EMBEDDED_REGION}-{ACCOUNT}"
    assert statements["RunPipelineJobs"]["Resource"][0].startswith(f"arn:aws:sagemaker:{EMBEDDED_REGION}:{ACCOUNT}:")
    assert_locked_down(bucket_settings(s3, target.bucket), "AES256")
    # a second command finds both and changes nothing
    again = targets.open_target(SimpleNamespace(aws=False), config)
    assert again.role_arn == target.role_arn
    assert iam.list_role_policies(RoleName=targets.ROLE_NAME)["PolicyNames"] == [policy_name(config)]
    reliability.record("security.iam", f"embedded AWS: role {targets.ROLE_NAME} carries the same policy "
                       f"({len(stored['Statement'])} statements) with the partition, region, account and bucket "
                       "resolved, via iam put_role_policy")


def test_hosting_role_and_model_in_a_vpc(reliability):
    template = build_template(package_description(), parse_stage(SECURE_STAGE), default_bucket=BUCKET)
    model = template["Resources"]["Model"]["Properties"]
    assert model["VpcConfig"] == {"Subnets": SUBNETS, "SecurityGroupIds": SECURITY_GROUPS}
    assert model["EnableNetworkIsolation"] is True
    policy = role_policies(template)["ExecutionRole/endpoint-hosting"]
    statements = by_sid(policy)
    assert iam_problems(policy) == []
    assert statements["ManageNetworkInterfaces"]["Resource"] == f"arn:aws:ec2:{REGION}:{ACCOUNT}:network-interface/*"
    assert [r for r in statements["CreateNetworkInterfacesInVpc"]["Resource"] if ":subnet/" in r] == [
        f"arn:aws:ec2:{REGION}:{ACCOUNT}:subnet/{subnet}" for subnet in SUBNETS]
    star = sorted(a for s in policy["Statement"] if s["Resource"] == "*" for a in as_list(s["Action"]))
    assert set(star) <= STAR_ONLY
    # without a VPC the hosting role has no EC2 permission at all
    plain = role_policies(build_template(package_description(), load_stage("prod"), default_bucket=BUCKET))
    assert not any(a.startswith("ec2:") for s in plain["ExecutionRole/endpoint-hosting"]["Statement"]
                   for a in as_list(s["Action"]))
    shipped = {name: load_stage(name).network_isolation for name in shipped_stages()}
    assert all(shipped.values()), shipped
    reliability.record("security.network", "endpoint template: Model gets VpcConfig and EnableNetworkIsolation "
                       f"from the stage; shipped stages {sorted(shipped)} isolate the model container")
    reliability.record("security.iam", f"hosting role: {len(policy['Statement'])} statements with a VPC (the EC2 "
                       "network-interface actions scoped to its subnets and security groups, Describe* on '*'), "
                       "none of them EC2 without one; every action and resource checked against IAM's catalog")


def test_stage_kms_key_encrypts_endpoint_volume_and_captured_data(reliability):
    template = build_template(package_description(), parse_stage(SECURE_STAGE), default_bucket=BUCKET)
    config = template["Resources"]["EndpointConfig"]["Properties"]
    assert config["KmsKeyId"] == config["DataCaptureConfig"]["KmsKeyId"] == "alias/endpoints"
    kms = by_sid(role_policies(template)["ExecutionRole/endpoint-hosting"])["UseKmsKey"]
    assert kms["Condition"] == {"ForAnyValue:StringEquals": {"kms:ResourceAliases": "alias/endpoints"}}
    reliability.record("security.kms", "endpoint: the stage's key on EndpointConfig.KmsKeyId (volumes) and "
                       "DataCaptureConfig.KmsKeyId; the hosting role may use only the keys with that alias")


# ----------------------------------------------------------------------------- buckets
def test_buckets_the_tool_creates_are_locked_down_and_existing_ones_untouched(aws, reliability):
    s3 = aws.client("s3")
    assert ensure_bucket(s3, "flanops-new", REGION) is True
    assert_locked_down(bucket_settings(s3, "flanops-new"), "AES256")
    s3_eu = boto3.client("s3", region_name="eu-west-1")
    assert ensure_bucket(s3_eu, "flanops-new-kms", "eu-west-1", kms_key_id=KMS_KEY) is True
    assert_locked_down(bucket_settings(s3_eu, "flanops-new-kms"), "aws:kms", KMS_KEY)
    assert s3_eu.get_bucket_location(Bucket="flanops-new-kms")["LocationConstraint"] == "eu-west-1"

    s3.create_bucket(Bucket="users-own")
    before = bucket_settings(s3, "users-own")
    assert before == {"public_access_block": "NoSuchPublicAccessBlockConfiguration", "policy": "NoSuchBucketPolicy",
                      "encryption": "ServerSideEncryptionConfigurationNotFoundError"}
    assert ensure_bucket(s3, "users-own", REGION, kms_key_id=KMS_KEY) is False
    assert bucket_settings(s3, "users-own") == before
    reliability.record("security.buckets", "a bucket created by flanops: public access block with all four "
                       "settings true, a policy denying s3:* when aws:SecureTransport is false, default encryption "
                       "AES256 (aws:kms with the configured key when set); a bucket that already existed: public "
                       "access block, policy and encryption unchanged. Embedded AWS (plain HTTP on 127.0.0.1) gets "
                       "all but the TLS-only policy, which would refuse every request there")


def test_sagemaker_default_bucket_is_created_locked_down_only_when_missing(aws, reliability):
    session = boto3.Session(region_name="eu-west-2")
    name = targets.default_bucket(session, KMS_KEY)
    assert name == f"sagemaker-eu-west-2-{ACCOUNT}"
    assert_locked_down(bucket_settings(session.client("s3"), name), "aws:kms", KMS_KEY)

    session = boto3.Session(region_name="ap-southeast-2")   # the user's own default bucket, made before flanops
    s3 = session.client("s3")
    s3.create_bucket(Bucket=f"sagemaker-ap-southeast-2-{ACCOUNT}",
                     CreateBucketConfiguration={"LocationConstraint": "ap-southeast-2"})
    before = bucket_settings(s3, f"sagemaker-ap-southeast-2-{ACCOUNT}")
    assert targets.default_bucket(session, KMS_KEY) == f"sagemaker-ap-southeast-2-{ACCOUNT}"
    assert bucket_settings(s3, f"sagemaker-ap-southeast-2-{ACCOUNT}") == before
    reliability.record("security.buckets", "--aws: a missing sagemaker-<region>-<account> is created by flanops "
                       "the same way (SSE-KMS with the config's key) before the SDK sees it; an existing one is "
                       "left as it was")


def test_no_tls_only_policy_where_s3_speaks_plain_http():
    """Embedded AWS is plain HTTP on 127.0.0.1: a TLS-only policy there would refuse every request."""
    calls: list[str] = []

    def recorder(name):
        return lambda **_: calls.append(name)

    def client(endpoint_url):
        calls.clear()
        return SimpleNamespace(meta=SimpleNamespace(endpoint_url=endpoint_url, partition="aws"),
                               **{name: recorder(name) for name in ("put_public_access_block", "put_bucket_encryption",
                                                                    "put_bucket_policy")})

    lock_down(client("http://127.0.0.1:45367"), "embedded", None)
    assert calls == ["put_public_access_block", "put_bucket_encryption"]
    lock_down(client("https://s3.us-east-1.amazonaws.com"), "cloud", None)
    assert calls == ["put_public_access_block", "put_bucket_encryption", "put_bucket_policy"]


def test_a_bucket_of_another_account_is_refused(aws, monkeypatch):
    s3 = aws.client("s3")
    forbidden = ClientError({"Error": {"Code": "403", "Message": "Forbidden"}}, "HeadBucket")
    monkeypatch.setattr(s3, "head_bucket", lambda **_: (_ for _ in ()).throw(forbidden))
    with pytest.raises(FlanopsError, match="exists but is not yours.*pass --bucket"):
        ensure_bucket(s3, "someone-elses", REGION, expected_owner=ACCOUNT)
    assert "someone-elses" not in {b["Name"] for b in s3.list_buckets()["Buckets"]}


# ----------------------------------------------------------------------------- linters
def test_every_template_is_cfn_lint_clean(templates, aws, tmp_path, capsys, reliability):
    findings = {name: lint_template(template, regions=[REGION, "eu-west-1"]) for name, template in templates.items()}
    assert findings == {name: [] for name in templates}
    # and as a user gets it: flanops role writes the pipeline role's template, linted
    out = tmp_path / "pipeline-role.json"
    assert cli.main(["role", "--out", str(out), "--region", REGION]) == 0
    assert "cfn-lint: clean" in capsys.readouterr().out
    written = json.loads(out.read_text(encoding="utf-8"))
    assert written == json.loads(json.dumps(templates["pipeline role (quick)"]))
    reliability.record("security.cfn_lint", f"cfn-lint clean (us-east-1 and eu-west-1) on all {len(templates)} "
                       f"templates: {', '.join(templates)}; `flanops role --out` writes and lints the same role",
                       templates=len(templates))


def test_iam_policies_pass_the_security_linter(templates, reliability):
    """cloudsplaining (IAM risk scan, offline): nothing but the accepted findings, in every template's policies."""
    policies = {f"{name}: {where}": policy for name, template in templates.items()
                for where, policy in role_policies(template).items()}
    assert len(policies) == len(templates)
    found = {where: risky_actions(policy) for where, policy in policies.items()}
    unexpected = {where: {kind: actions - {a for a, k in ACCEPTED_RISKS.items() if k == kind}
                          for kind, actions in kinds.items()} for where, kinds in found.items()}
    assert all(not actions for kinds in unexpected.values() for actions in kinds.values()), unexpected
    problems = {where: iam_problems(policy) for where, policy in policies.items()}
    assert problems == {where: [] for where in policies}
    reliability.record("security.iac_lint", f"cloudsplaining on the {len(policies)} IAM policies of every template: "
                       "no privilege escalation, data exfiltration, permissions management or unconstrained write; "
                       "accepted: ecr:GetAuthorizationToken (no resource-level permission); every action and "
                       "resource also checked against IAM's action catalog (policy_sentry)", policies=len(policies))

