"""The pipeline execution role: what SageMaker Pipelines and the pipeline's jobs may do, and no more.

The role is the one the pipeline is upserted with and every job runs as (``--role``). Its
policy follows from the config and the definition that ``flanops.pipelines.definition`` builds from it:

- S3: read and write ``s3://<bucket>/<pipeline>/*``, the one prefix the pipeline uses (code
  under ``<pipeline>/code/<sha256>/``, each step's outputs under ``<pipeline>/<execution id>/``,
  read back by later steps and by the gate), list only that prefix; read ``InputDataUri`` when
  it is an s3:// URI (``prepare_data.py`` reads it itself).
- SageMaker: create, describe and stop the pipeline's processing and training jobs; register
  model packages in the configured group.
- CloudWatch Logs: the processing and training jobs' log groups. ECR: pull the jobs' two images.
- iam:PassRole on this role only, to SageMaker only (the pipeline hands it to its jobs).
- KMS: the configured key (``security.kms_key_id``), grants for the jobs' volumes included.
  EC2: the network interfaces that put jobs into the configured VPC (``security.vpc``).

``pipeline_role_template`` wraps it in a CloudFormation template (``flanops role``); without a
bucket it names the account's SageMaker default bucket, so the template hard-codes no account
and no region. ``put_pipeline_policy`` attaches the same policy to embedded AWS's role.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from flanops.pipelines.errors import FlanopsError

from .template import (ACCOUNT, PARTITION, REGION, TEMPLATE_FORMAT_VERSION, _ecr_pull_statements, _join,
                       _kms_statement, _s3_bucket_arn, _s3_object_arn, _vpc_statements, parse_s3_uri)

if TYPE_CHECKING:
    from flanops.pipelines.config import PipelineConfig

SAGEMAKER_TRUST = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"Service": "sagemaker.amazonaws.com"}, "Action": "sts:AssumeRole"}]}
ROLE_ID = "PipelineRole"
# The SageMaker SDK's default bucket, sagemaker-<region>-<account>, as CloudFormation resolves it.
DEFAULT_BUCKET = _join("sagemaker-", REGION, "-", ACCOUNT)
# SageMaker Pipelines names the jobs it starts pipelines-<execution id>-<step>-<suffix>: no part
# of the name says which pipeline, so this prefix is the narrowest a job ARN can be scoped to.
PIPELINE_JOB_PREFIX = "pipelines-"
JOB_LOG_GROUPS = ("/aws/sagemaker/ProcessingJobs", "/aws/sagemaker/TrainingJobs")
JOB_ACTIONS = ["sagemaker:AddTags", "sagemaker:CreateProcessingJob", "sagemaker:CreateTrainingJob",
               "sagemaker:DescribeProcessingJob", "sagemaker:DescribeTrainingJob", "sagemaker:StopProcessingJob",
               "sagemaker:StopTrainingJob"]
REGISTRY_ACTIONS = ["sagemaker:AddTags", "sagemaker:CreateModelPackage", "sagemaker:CreateModelPackageGroup",
                    "sagemaker:DescribeModelPackage", "sagemaker:DescribeModelPackageGroup"]


def policy_name(config: PipelineConfig) -> str:
    return f"flanops-pipeline-{config.pipeline_name}"[:128]   # IAM's limit for an inline policy name


def pipeline_policy(config: PipelineConfig, *, region: str, bucket: str | dict, role_arn: str | dict) -> dict:
    """The role's permissions for ``config``'s pipeline in ``region`` (its images are per region).

    ``bucket``: the default bucket's name or an expression for it; ``role_arn``: the role's own
    ARN or an expression for it (iam:PassRole names it).
    """
    from flanops.pipelines.definition import job_images

    name = config.pipeline_name
    values = config.parameter_values()
    images = job_images(config, region)
    statements: list[dict[str, Any]] = [
        {"Sid": "ReadWritePipelineData", "Effect": "Allow",
         "Action": ["s3:AbortMultipartUpload", "s3:GetObject", "s3:PutObject"],
         "Resource": [_s3_object_arn(bucket, f"{name}/*")]},
        {"Sid": "ListPipelineData", "Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": _s3_bucket_arn(bucket),
         "Condition": {"StringLike": {"s3:prefix": [name, f"{name}/*"]}}},
    ]
    buckets = [_s3_bucket_arn(bucket)]
    if values["InputDataUri"].startswith("s3://"):
        statements += _input_data_statements(values["InputDataUri"])
        input_bucket = parse_s3_uri(values["InputDataUri"])[0]
        if input_bucket != bucket:
            buckets.append(_s3_bucket_arn(input_bucket))
    statements += [
        {"Sid": "LocateBuckets", "Effect": "Allow", "Action": ["s3:GetBucketLocation"], "Resource": buckets},
        {"Sid": "RunPipelineJobs", "Effect": "Allow", "Action": JOB_ACTIONS,
         "Resource": [_sagemaker_arn(f"{kind}/{PIPELINE_JOB_PREFIX}*") for kind in ("processing-job", "training-job")]},
        {"Sid": "RegisterModelPackages", "Effect": "Allow", "Action": REGISTRY_ACTIONS,
         "Resource": _model_package_arns(values["ModelPackageGroupName"])},
        {"Sid": "WriteJobLogs", "Effect": "Allow",
         "Action": ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:DescribeLogStreams", "logs:PutLogEvents"],
         # each group itself and what lies in it (…/ProcessingJobs:log-stream:<job>/…)
         "Resource": [_join("arn:", PARTITION, ":logs:", REGION, ":", ACCOUNT, f":log-group:{group}{suffix}")
                      for group in JOB_LOG_GROUPS for suffix in ("", ":*")]},
        *_ecr_pull_statements([images["processing"], images["training"]], "PullJobImages"),
        {"Sid": "PassThisRoleToJobs", "Effect": "Allow", "Action": ["iam:PassRole"], "Resource": role_arn,
         "Condition": {"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}},
    ]
    security = config.security
    if security.kms_key_id:
        use_key = _kms_statement(security.kms_key_id)
        # SageMaker encrypts the jobs' storage volumes through grants on the key, made as this role.
        statements += [use_key, {**use_key, "Sid": "GrantKmsKeyToJobVolumes", "Action": ["kms:CreateGrant"],
                                 "Condition": {**use_key.get("Condition", {}),
                                               "Bool": {"kms:GrantIsForAWSResource": "true"}}}]
    if security.vpc is not None:
        statements += _vpc_statements(security.vpc)
    return {"Version": "2012-10-17", "Statement": statements}


def pipeline_role_template(config: PipelineConfig, *, region: str, bucket: str | None = None) -> dict:
    """The role as a CloudFormation stack; its RoleArn output is what ``flanops run --aws --role`` takes."""
    role_arn = {"Fn::GetAtt": [ROLE_ID, "Arn"]}
    name = config.pipeline_name
    return {
        "AWSTemplateFormatVersion": TEMPLATE_FORMAT_VERSION,
        "Description": f"flanops pipeline execution role for pipeline {name} (least privilege)",
        "Metadata": {"flanops": {"pipeline_name": name, "config": config.source,
                                 "bucket": bucket or "sagemaker-<region>-<account> (the SageMaker default bucket)"}},
        "Resources": {
            ROLE_ID: {"Type": "AWS::IAM::Role", "Properties": {
                "Description": f"SageMaker pipeline {name} and its jobs",
                "AssumeRolePolicyDocument": SAGEMAKER_TRUST,
                "Tags": [{"Key": "flanops:pipeline", "Value": name}]}},
            # A policy of its own, not the role's Policies: it names the role's ARN (iam:PassRole),
            # which the role cannot reference inside itself.
            "PipelinePolicy": {"Type": "AWS::IAM::RolePolicy", "Properties": {
                "RoleName": {"Ref": ROLE_ID}, "PolicyName": policy_name(config),
                "PolicyDocument": pipeline_policy(config, region=region, bucket=bucket or DEFAULT_BUCKET,
                                                  role_arn=role_arn)}},
        },
        "Outputs": {"RoleArn": {"Description": "pass it to flanops: --role ARN or FLANOPS_ROLE_ARN",
                                "Value": role_arn}},
    }


def put_pipeline_policy(session, role_arn: str, config: PipelineConfig, *, bucket: str) -> dict:
    """Attach the pipeline's policy to an existing role (embedded AWS's), as the document IAM stores."""
    region = session.region_name
    _, partition, _, _, account, resource = role_arn.split(":", 5)
    policy = resolve_pseudo(pipeline_policy(config, region=region, bucket=bucket, role_arn=role_arn),
                            {"AWS::Partition": partition, "AWS::Region": region, "AWS::AccountId": account})
    session.client("iam").put_role_policy(RoleName=resource.rsplit("/", 1)[-1], PolicyName=policy_name(config),
                                          PolicyDocument=json.dumps(policy))
    return policy


def resolve_pseudo(value: Any, pseudo: dict[str, str]) -> Any:
    """``value`` with pseudo parameters and Fn::Join resolved as CloudFormation would (for IAM calls without it)."""
    if isinstance(value, list):
        return [resolve_pseudo(item, pseudo) for item in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"Ref"} and value["Ref"] in pseudo:
        return pseudo[value["Ref"]]
    if set(value) == {"Fn::Join"}:
        separator, parts = value["Fn::Join"]
        return separator.join(resolve_pseudo(part, pseudo) for part in parts)
    unresolved = [key for key in value if key == "Ref" or key.startswith("Fn::")]
    if unresolved:
        raise FlanopsError(f"{value} cannot be resolved outside CloudFormation")
    return {key: resolve_pseudo(item, pseudo) for key, item in value.items()}


def _input_data_statements(uri: str) -> list[dict[str, Any]]:
    bucket, prefix = parse_s3_uri(uri)
    if not prefix:   # the whole bucket
        return [{"Sid": "ReadInputData", "Effect": "Allow", "Action": ["s3:GetObject"],
                 "Resource": [_s3_object_arn(bucket, "*")]},
                {"Sid": "ListInputData", "Effect": "Allow", "Action": ["s3:ListBucket"],
                 "Resource": _s3_bucket_arn(bucket)}]
    # The URI names a file or a folder: the object itself and everything below it.
    return [{"Sid": "ReadInputData", "Effect": "Allow", "Action": ["s3:GetObject"],
             "Resource": [_s3_object_arn(bucket, prefix), _s3_object_arn(bucket, f"{prefix}/*")]},
            {"Sid": "ListInputData", "Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": _s3_bucket_arn(bucket),
             "Condition": {"StringLike": {"s3:prefix": [prefix, f"{prefix}/*"]}}}]


def _sagemaker_arn(resource: str) -> dict:
    return _join("arn:", PARTITION, ":sagemaker:", REGION, ":", ACCOUNT, f":{resource}")


def _model_package_arns(group: str) -> list[dict]:
    # SageMaker puts names into ARNs in lower case; the group as configured is kept as well.
    names = sorted({group, group.lower()})
    return [_sagemaker_arn(f"model-package-group/{name}") for name in names] + \
           [_sagemaker_arn(f"model-package/{name}/*") for name in names]
