"""Where a command works: embedded AWS on this machine (the default) or your AWS account (``--aws``),
with the pipeline's execution role and its bucket there."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from flanops.infra.buckets import ensure_bucket
from flanops.infra.pipeline_role import SAGEMAKER_TRUST, put_pipeline_policy

from .config import PipelineConfig
from .definition import quiet_sdk
from .embedded import ensure_server
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

    bucket, account = sdk_default_bucket(session)
    ensure_bucket(session.client("s3"), bucket, session.region_name, kms_key_id=kms_key_id, expected_owner=account)
    return PipelineSession(boto_session=session).default_bucket()


def target_session(target: TargetChoice = LOCAL):
    """The boto3 session of the target, for commands that need no pipeline role: embedded AWS or ``--aws``."""
    if target.aws:
        return aws_session()
    aws = ensure_server()
    aws.activate()
    return aws.boto_session()

