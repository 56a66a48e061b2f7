"""The endpoint stack as a CloudFormation template, built from a model package and a stage.

``build_template(package, stage, default_bucket=...)`` takes the ``describe_model_package``
response of a registered package and a :class:`~flanops.infra.stages.StageConfig` and returns
the template as a dict (``json.dumps`` it for CloudFormation):

- ``ExecutionRole``: the role SageMaker hosting assumes, least privilege: read the model
  artifacts' S3 prefix (from each container's ModelDataUrl), write the data-capture prefix,
  write logs under /aws/sagemaker/Endpoints/*, pull the container image from its ECR
  repository, use the stage's KMS key when one is set, and manage the network interfaces
  that put the model into the stage's VPC when it has one.
- ``Model`` (from the package: ``PrimaryContainer.ModelPackageName``), ``EndpointConfig``
  (instances or serverless, data capture, KMS) and ``Endpoint``.
- ``ScalableTarget`` + ``ScalingPolicy`` (target tracking on invocations per instance) when
  the stage autoscales, and alarms on Invocation5XXErrors and ModelLatency.

CloudFormation names every resource (no fixed EndpointName etc.), so stacks for several stages
or groups never collide; the names come back as stack Outputs. Regions, accounts and the
partition are pseudo parameters; everything else is derived from the package and the stage.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from flanops.pipelines.errors import FlanopsError
from flanops.pipelines.s3 import parse_s3_uri

from .stages import StageConfig, Vpc

VARIANT_NAME = "AllTraffic"  # the SageMaker SDK's default variant name
TEMPLATE_FORMAT_VERSION = "2010-09-09"

TAG_STAGE = "flanops:stage"
TAG_GROUP = "flanops:model-package-group"
# Names the package a resource serves. It also puts the package into the Model's,
# EndpointConfig's and Endpoint's own properties: moto's change sets diff each resource's
# JSON and do not propagate a replacement to dependents (real CloudFormation does), so
# without it moto would replace the Model and leave the endpoint on the old one.
TAG_PACKAGE = "flanops:model-package-arn"

# Tells IaC scanners (checkov) why a serverless stage's model runs without network isolation.
SERVERLESS_MODEL_METADATA = {"checkov": {"skip": [{
    "id": "CKV_AWS_370", "comment": "SageMaker serverless endpoints do not support network isolation"}]}}

PARTITION = {"Ref": "AWS::Partition"}
REGION = {"Ref": "AWS::Region"}
ACCOUNT = {"Ref": "AWS::AccountId"}

_ECR_IMAGE = re.compile(r"^(?P<account>\d{12})\.dkr\.ecr(-fips)?\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(\.cn)?"
                        r"/(?P<repository>[a-z0-9._/-]+?)([:@].+)?$")
_GROUP_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")


def stack_name(group: str, stage_name: str) -> str:
    """The stack for ``group`` in ``stage_name``: ``<group>-<stage>`` (stack names start with a letter)."""
    if not _GROUP_NAME.match(group):
        raise FlanopsError(f"model package group {group!r}: not a SageMaker group name "
                           "(letters, digits and hyphens, at most 63)")
    name = f"{group}-{stage_name}"
    return name if name[0].isalpha() else f"flanops-{name}"


def data_capture_uri(stage: StageConfig, group: str, default_bucket: str | None) -> str | None:
    """Where the endpoint captures data, or None when the stage does not capture."""
    if not stage.data_capture.enabled:
        return None
    if stage.data_capture.s3_uri:
        return stage.data_capture.s3_uri.rstrip("/")
    if not default_bucket:
        raise FlanopsError(f"stage {stage.name} ({stage.source}): data capture needs a destination; "
                           "set data_capture.s3_uri or pass a default bucket")
    return f"s3://{default_bucket}/{group}/{stage.name}/data-capture"


def build_template(package: dict[str, Any], stage: StageConfig, *, default_bucket: str | None) -> dict[str, Any]:
    """The stack that hosts ``package`` (a describe_model_package response) the way ``stage`` says."""
    arn, group, containers = _package_parts(package)
    capture_uri = data_capture_uri(stage, group, default_bucket)
    tags = [{"Key": TAG_STAGE, "Value": stage.name}, {"Key": TAG_GROUP, "Value": group},
            {"Key": TAG_PACKAGE, "Value": arn}]

    # Resource order matters to moto: its change sets apply modifications in template order,
    # so each resource comes after the ones it references.
    resources: dict[str, Any] = {
        "ExecutionRole": {
            "Type": "AWS::IAM::Role",
            "Properties": {
                "Description": f"SageMaker hosting role for {group} ({stage.name})",
                "AssumeRolePolicyDocument": {"Version": "2012-10-17", "Statement": [{
                    "Effect": "Allow", "Principal": {"Service": "sagemaker.amazonaws.com"},
                    "Action": "sts:AssumeRole"}]},
                "Policies": [{"PolicyName": "endpoint-hosting",
                              "PolicyDocument": execution_policy(containers, capture_uri, stage.kms_key_id, stage.vpc)}],
                "Tags": tags,
            },
        },
        "Model": {
            "Type": "AWS::SageMaker::Model",
            "Properties": _model_properties(stage, arn, tags),
            **({"Metadata": SERVERLESS_MODEL_METADATA} if stage.is_serverless else {}),
        },
        "EndpointConfig": {
            "Type": "AWS::SageMaker::EndpointConfig",
            "Properties": _endpoint_config_properties(stage, capture_uri, tags),
        },
        "Endpoint": {
            "Type": "AWS::SageMaker::Endpoint",
            "Properties": {
                "EndpointConfigName": {"Fn::GetAtt": ["EndpointConfig", "EndpointConfigName"]},
                "Tags": tags,
            },
        },
    }
    endpoint_name = {"Fn::GetAtt": ["Endpoint", "EndpointName"]}
    if stage.autoscaling is not None:
        resources.update(_autoscaling_resources(stage, endpoint_name))
    resources.update(_alarm_resources(stage, endpoint_name, tags))

    outputs = {
        "EndpointName": {"Description": "the SageMaker endpoint to invoke", "Value": endpoint_name},
        "EndpointConfigName": {"Value": {"Fn::GetAtt": ["EndpointConfig", "EndpointConfigName"]}},
        "ModelName": {"Value": {"Fn::GetAtt": ["Model", "ModelName"]}},
        "RoleArn": {"Description": "the role the endpoint runs as", "Value": {"Fn::GetAtt": ["ExecutionRole", "Arn"]}},
        "ModelPackageArn": {"Description": "the model package the endpoint serves", "Value": arn},
        "Stage": {"Value": stage.name},
    }
    if capture_uri:
        outputs["DataCaptureS3Uri"] = {"Description": "where requests and responses are captured", "Value": capture_uri}

    return {
        "AWSTemplateFormatVersion": TEMPLATE_FORMAT_VERSION,
        "Description": f"flanops endpoint: model package group {group}, stage {stage.name}",
        # The inputs the stack was built from, kept with it (nothing here may vary between
        # identical deploys, or CloudFormation would see a change each time).
        "Metadata": {"flanops": {"model_package_arn": arn, "stage": stage.model_dump(mode="json", exclude_none=True)}},
        "Resources": resources,
        "Outputs": outputs,
    }


def execution_policy(containers: list[dict[str, Any]], capture_uri: str | None, kms_key_id: str | None,
                     vpc: Vpc | None = None) -> dict:
    """The hosting role's permissions; every statement names the resources it is for."""
    model_objects = sorted({_model_read_resource(c["ModelDataUrl"]) for c in containers if c.get("ModelDataUrl")})
    log_groups = ["arn:", PARTITION, ":logs:", REGION, ":", ACCOUNT, ":log-group:/aws/sagemaker/Endpoints/*"]
    statements: list[dict[str, Any]] = []
    if model_objects:
        statements.append({"Sid": "ReadModelArtifacts", "Effect": "Allow", "Action": ["s3:GetObject"],
                           "Resource": [_s3_object_arn(bucket, key) for bucket, key in model_objects]})
    if capture_uri:
        bucket, prefix = parse_s3_uri(capture_uri)
        statements.append({"Sid": "WriteDataCapture", "Effect": "Allow", "Action": ["s3:PutObject"],
                           "Resource": [_s3_object_arn(bucket, f"{prefix}/*" if prefix else "*")]})
    statements += [
        {"Sid": "WriteEndpointLogs", "Effect": "Allow",
         "Action": ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:DescribeLogStreams", "logs:PutLogEvents"],
         "Resource": [_join(*log_groups), _join(*log_groups, ":log-stream:*")]},
        *_ecr_pull_statements([c["Image"] for c in containers], "PullInferenceImage"),
    ]
    if kms_key_id:
        statements.append(_kms_statement(kms_key_id))
    if vpc is not None:
        statements += _vpc_statements(vpc)
    return {"Version": "2012-10-17", "Statement": statements}


def lint_template(template: dict[str, Any], regions: list[str] | None = None) -> list[str]:
    """cfn-lint's findings for ``template`` ("E3012 line 40: …"); empty when it is clean."""
    try:
        from cfnlint.api import lint
    except ImportError:
        raise FlanopsError("cfn-lint is not installed: pip install cfn-lint (or the 'test' extra)") from None
    text = json.dumps(template, indent=2)
    return [f"{match.rule.id} line {match.linenumber}: {match.message}" for match in lint(text, regions=regions)]


def write_template(template: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(template, indent=2) + "\n", encoding="utf-8")
    return path


def _package_parts(package: dict[str, Any]) -> tuple[str, str, list[dict[str, Any]]]:
    arn = package.get("ModelPackageArn")
    group = package.get("ModelPackageGroupName")
    containers = (package.get("InferenceSpecification") or {}).get("Containers") or []
    if not arn or not group:
        raise FlanopsError("the model package has no ModelPackageArn or ModelPackageGroupName; "
                           "deploy a versioned package from a model package group")
    if not containers or not all(container.get("Image") for container in containers):
        raise FlanopsError(f"model package {arn} has no inference container image "
                           "(InferenceSpecification.Containers[].Image); it cannot be hosted")
    return arn, group, containers


def _model_properties(stage: StageConfig, package_arn: str, tags: list[dict]) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "ExecutionRoleArn": {"Fn::GetAtt": ["ExecutionRole", "Arn"]},
        "PrimaryContainer": {"ModelPackageName": package_arn},
    }
    if stage.vpc is not None:
        properties["VpcConfig"] = {"Subnets": stage.vpc.subnets, "SecurityGroupIds": stage.vpc.security_group_ids}
    if stage.network_isolation:
        properties["EnableNetworkIsolation"] = True
    properties["Tags"] = tags
    return properties


def _endpoint_config_properties(stage: StageConfig, capture_uri: str | None, tags: list[dict]) -> dict[str, Any]:
    variant: dict[str, Any] = {"VariantName": VARIANT_NAME, "ModelName": {"Fn::GetAtt": ["Model", "ModelName"]}}
    if stage.serverless is not None:
        variant["ServerlessConfig"] = {"MemorySizeInMB": stage.serverless.memory_size_mb,
                                       "MaxConcurrency": stage.serverless.max_concurrency}
    else:
        variant.update({"InstanceType": stage.instance_type, "InitialInstanceCount": stage.initial_instance_count,
                        "InitialVariantWeight": 1.0})
    properties: dict[str, Any] = {"ProductionVariants": [variant]}
    if capture_uri:
        capture: dict[str, Any] = {
            "EnableCapture": True,
            "InitialSamplingPercentage": stage.data_capture.sampling_percentage,
            "DestinationS3Uri": capture_uri,
            "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
            "CaptureContentTypeHeader": {"JsonContentTypes": ["application/json"]},
        }
        if stage.kms_key_id:
            capture["KmsKeyId"] = stage.kms_key_id
        properties["DataCaptureConfig"] = capture
    if stage.kms_key_id:
        properties["KmsKeyId"] = stage.kms_key_id
    properties["Tags"] = tags
    return properties


def _autoscaling_resources(stage: StageConfig, endpoint_name: dict) -> dict[str, Any]:
    scaling = stage.autoscaling
    return {
        "ScalableTarget": {
            "Type": "AWS::ApplicationAutoScaling::ScalableTarget",
            # No RoleARN: Application Auto Scaling uses its SageMaker service-linked role.
            "Properties": {
                "ServiceNamespace": "sagemaker",
                "ScalableDimension": "sagemaker:variant:DesiredInstanceCount",
                "ResourceId": _join("endpoint/", endpoint_name, f"/variant/{VARIANT_NAME}"),
                "MinCapacity": scaling.min_capacity,
                "MaxCapacity": scaling.max_capacity,
            },
        },
        "ScalingPolicy": {
            "Type": "AWS::ApplicationAutoScaling::ScalingPolicy",
            "Properties": {
                "PolicyName": {"Fn::Sub": "${AWS::StackName}-invocations-per-instance"},
                "PolicyType": "TargetTrackingScaling",
                "ScalingTargetId": {"Ref": "ScalableTarget"},
                "TargetTrackingScalingPolicyConfiguration": {
                    "TargetValue": scaling.target_invocations_per_instance,
                    "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
                    "ScaleInCooldown": scaling.scale_in_cooldown_seconds,
                    "ScaleOutCooldown": scaling.scale_out_cooldown_seconds,
                },
            },
        },
    }


def _alarm_resources(stage: StageConfig, endpoint_name: dict, tags: list[dict]) -> dict[str, Any]:
    alarms = stage.alarms
    actions = [alarms.notify_topic_arn] if alarms.notify_topic_arn else []

    def alarm(metric: str, statistic: str, threshold: float, description: str) -> dict[str, Any]:
        properties: dict[str, Any] = {
            "AlarmDescription": f"{description} (stage {stage.name})",
            "Namespace": "AWS/SageMaker",
            "MetricName": metric,
            "Dimensions": [{"Name": "EndpointName", "Value": endpoint_name},
                           {"Name": "VariantName", "Value": VARIANT_NAME}],
            "Statistic": statistic,
            "Period": alarms.period_seconds,
            "EvaluationPeriods": alarms.evaluation_periods,
            "Threshold": threshold,
            "ComparisonOperator": "GreaterThanThreshold",
            "TreatMissingData": "notBreaching",  # an idle endpoint is not failing
            "Tags": tags,
        }
        if actions:
            properties["AlarmActions"] = actions
        return {"Type": "AWS::CloudWatch::Alarm", "Properties": properties}

    return {
        "Invocation5XXErrorsAlarm": alarm("Invocation5XXErrors", "Sum", alarms.max_5xx_errors,
                                          f"more than {alarms.max_5xx_errors} 5XX errors per {alarms.period_seconds} s"),
        # ModelLatency is reported in microseconds.
        "ModelLatencyAlarm": alarm("ModelLatency", "Average", alarms.max_model_latency_ms * 1000,
                                   f"average model latency above {alarms.max_model_latency_ms:g} ms"),
    }


def _model_read_resource(model_data_url: str) -> tuple[str, str]:
    """The model's S3 prefix (the folder holding model.tar.gz) as (bucket, key pattern)."""
    bucket, key = parse_s3_uri(model_data_url)
    folder = key.rpartition("/")[0] if key.endswith(".tar.gz") else key
    if not folder:
        return bucket, key  # an archive at the bucket's root: that object alone
    return bucket, f"{folder}/*"


def _ecr_pull_statements(images: list[str], sid: str) -> list[dict[str, Any]]:
    """Pull ``images`` (each from its own ECR repository) and nothing else."""
    repositories = sorted({_ecr_repository(image) for image in images})
    return [
        {"Sid": sid, "Effect": "Allow",
         "Action": ["ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"],
         "Resource": [_join("arn:", PARTITION, f":ecr:{region}:{account}:repository/{repository}")
                      for account, region, repository in repositories]},
        # GetAuthorizationToken has no resource-level permissions: "*" is the only resource it takes.
        {"Sid": "AuthenticateToEcr", "Effect": "Allow", "Action": ["ecr:GetAuthorizationToken"], "Resource": "*"},
    ]


def _vpc_statements(vpc: Vpc) -> list[dict[str, Any]]:
    """What SageMaker does with the role to attach jobs or endpoints to ``vpc``: network interfaces in its subnets."""
    def ec2_arn(resource: str) -> dict:
        return _join("arn:", PARTITION, ":ec2:", REGION, ":", ACCOUNT, f":{resource}")

    interfaces = ec2_arn("network-interface/*")   # SageMaker names them when it creates them
    return [
        {"Sid": "CreateNetworkInterfacesInVpc", "Effect": "Allow", "Action": ["ec2:CreateNetworkInterface"],
         "Resource": [interfaces, *[ec2_arn(f"subnet/{subnet}") for subnet in vpc.subnets],
                      *[ec2_arn(f"security-group/{group}") for group in vpc.security_group_ids]]},
        {"Sid": "ManageNetworkInterfaces", "Effect": "Allow",
         "Action": ["ec2:CreateNetworkInterfacePermission", "ec2:DeleteNetworkInterface",
                    "ec2:DeleteNetworkInterfacePermission"],
         "Resource": interfaces},
        # EC2's Describe* actions have no resource-level permissions: "*" is the only resource they take.
        {"Sid": "DescribeVpc", "Effect": "Allow",
         "Action": ["ec2:DescribeDhcpOptions", "ec2:DescribeNetworkInterfaces", "ec2:DescribeSecurityGroups",
                    "ec2:DescribeSubnets", "ec2:DescribeVpcs"],
         "Resource": "*"},
    ]


def _ecr_repository(image: str) -> tuple[str, str, str]:
    match = _ECR_IMAGE.match(image)
    if not match:
        raise FlanopsError(f"inference image {image!r} is not an Amazon ECR image URI "
                           "(<account>.dkr.ecr.<region>.amazonaws.com/<repository>:<tag>); SageMaker hosts ECR images only")
    return match["account"], match["region"], match["repository"]


def _kms_statement(kms_key_id: str) -> dict[str, Any]:
    actions = ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey"]
    key_arns = _join("arn:", PARTITION, ":kms:", REGION, ":", ACCOUNT, ":key/*")
    if kms_key_id.startswith("arn:") and ":key/" in kms_key_id:
        return {"Sid": "UseKmsKey", "Effect": "Allow", "Action": actions, "Resource": kms_key_id}
    if kms_key_id.startswith("arn:") or kms_key_id.startswith("alias/"):
        # An alias is not a key ARN; grant the keys that carry this alias, and no other.
        alias = "alias/" + kms_key_id.split(":alias/")[-1].removeprefix("alias/")
        return {"Sid": "UseKmsKey", "Effect": "Allow", "Action": actions, "Resource": key_arns,
                "Condition": {"ForAnyValue:StringEquals": {"kms:ResourceAliases": alias}}}
    return {"Sid": "UseKmsKey", "Effect": "Allow", "Action": actions,
            "Resource": _join("arn:", PARTITION, ":kms:", REGION, ":", ACCOUNT, f":key/{kms_key_id}")}


def _s3_object_arn(bucket: str | dict, key: str) -> dict:
    return _s3_arn(bucket, f"/{key}")


def _s3_bucket_arn(bucket: str | dict) -> dict:
    return _s3_arn(bucket, "")


def _s3_arn(bucket: str | dict, suffix: str) -> dict:
    """``bucket``: a name, or an Fn::Join that CloudFormation resolves to one (the account's default bucket)."""
    # Fn::Join rather than Fn::Sub: an S3 key may contain "${".
    if isinstance(bucket, str):
        return _join("arn:", PARTITION, f":s3:::{bucket}{suffix}")
    return _join("arn:", PARTITION, ":s3:::", *bucket["Fn::Join"][1], *([suffix] if suffix else []))


def _join(*parts: Any) -> dict:
    return {"Fn::Join": ["", list(parts)]}
