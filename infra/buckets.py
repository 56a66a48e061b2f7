"""Buckets that flanops creates: no public access, TLS only, encrypted by default.

``ensure_bucket`` creates a bucket when it does not exist yet and locks it down; a bucket that
already exists belongs to the user and is left exactly as it is. The embedded default bucket
and, with ``--aws``, the SageMaker default bucket (``sagemaker-<region>-<account>``) go through
it, so both get the same settings, but for one: embedded AWS serves plain HTTP on 127.0.0.1,
where a TLS-only policy could only refuse every request (moto also applies such a Deny without
evaluating its condition), so the policy goes on buckets reached over HTTPS.
"""
from __future__ import annotations

import json
from urllib.parse import urlparse

from flanops.pipelines.errors import FlanopsError

PUBLIC_ACCESS_BLOCK = {"BlockPublicAcls": True, "IgnorePublicAcls": True,
                       "BlockPublicPolicy": True, "RestrictPublicBuckets": True}
_MISSING = ("404", "NoSuchBucket", "NotFound")
_FORBIDDEN = ("403", "AccessDenied", "Forbidden")


def ensure_bucket(s3, bucket: str, region: str, *, kms_key_id: str | None = None,
                  expected_owner: str | None = None) -> bool:
    """Create ``bucket`` locked down if it does not exist; True when this call created it.

    ``kms_key_id``: default encryption SSE-KMS with that key (else SSE-S3). ``expected_owner``:
    the account that must own an existing bucket of that name (a predictable default name
    could have been taken by another account).
    """
    from botocore.exceptions import ClientError

    owner = {"ExpectedBucketOwner": expected_owner} if expected_owner else {}
    try:
        s3.head_bucket(Bucket=bucket, **owner)
        return False
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code")
        if code in _FORBIDDEN:
            raise FlanopsError(f"bucket {bucket} exists but is not yours or not open to you (S3 said {code}); "
                               "pass --bucket NAME with a bucket you can write to") from None
        if code not in _MISSING:
            raise
    location = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    try:
        s3.create_bucket(Bucket=bucket, **location)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") == "BucketAlreadyOwnedByYou":
            return False   # created meanwhile by another command of ours, which locked it down
        raise
    lock_down(s3, bucket, kms_key_id)
    return True


def lock_down(s3, bucket: str, kms_key_id: str | None) -> None:
    """Block public access, deny requests without TLS, encrypt new objects by default."""
    s3.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration=PUBLIC_ACCESS_BLOCK)
    if kms_key_id:
        # A bucket key cuts KMS requests (and their cost) for the many small objects a run writes.
        rule = {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": kms_key_id},
                "BucketKeyEnabled": True}
    else:
        rule = {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}
    s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={"Rules": [rule]})
    if urlparse(s3.meta.endpoint_url).scheme == "https":   # see the module's docstring
        s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(tls_only_policy(bucket, s3.meta.partition)))


def tls_only_policy(bucket: str, partition: str) -> dict:
    arn = f"arn:{partition}:s3:::{bucket}"
    return {"Version": "2012-10-17", "Statement": [{
        "Sid": "DenyInsecureTransport", "Effect": "Deny", "Principal": "*", "Action": "s3:*",
        "Resource": [arn, f"{arn}/*"], "Condition": {"Bool": {"aws:SecureTransport": "false"}}}]}
