"""S3 URIs and prefix downloads for the step scripts (they ship alone; the client side has pipelines/s3.py).

Every error is a one-line StepError that starts with what the user passed (``label``, e.g.
``--input s3://bucket/data``) and says what to do. boto3 is imported when S3 is used, never at import.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from .archive import path_inside
from .errors import StepError


def split_s3_uri(uri: str, flag: str) -> tuple[str, str]:
    """``s3://bucket/key`` → ``("bucket", "key")``; a URI without a bucket is a StepError naming ``flag``."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StepError(f"{flag} {uri}: no bucket; write s3://bucket/prefix/")
    return bucket, key


@contextlib.contextmanager
def s3_errors(label: str, bucket: str) -> Iterator[None]:
    """Turn what boto3 raises inside the block into a StepError that starts with ``label``."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        yield
    except NoCredentialsError:
        raise StepError(f"{label}: no AWS credentials found; configure credentials for the account "
                        "that holds the bucket") from None
    except ClientError as err:
        error = err.response.get("Error", {})
        if error.get("Code") == "NoSuchBucket":
            raise StepError(f"{label}: bucket {bucket!r} does not exist; check its name, and the account and region "
                            "your AWS credentials point at (NoSuchBucket)") from None
        raise StepError(f"{label}: S3 refused the request ({error.get('Code')}: {error.get('Message')})") from None
    except BotoCoreError as err:
        raise StepError(f"{label}: cannot reach S3 ({err})") from None


def prefix_keys(client, bucket: str, prefix: str) -> tuple[str, list[str]]:
    """S3Prefix semantics: (the folder the keys are relative to, the keys).

    The one object ``prefix`` names, or every object below the folder ``prefix`` ("raw" does not
    match "raw-old/..."; folder markers, keys ending in "/", are left out).
    """
    keys = [obj["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for obj in page.get("Contents", [])]
    if prefix in keys and not prefix.endswith("/"):  # the prefix names one object
        return prefix.rpartition("/")[0], [prefix]
    folder = prefix.rstrip("/")
    return folder, [key for key in keys if not key.endswith("/") and (not folder or key.startswith(folder + "/"))]


def relative_key(key: str, folder: str) -> str:
    """``key``'s path below ``folder`` (as prefix_keys returns them)."""
    return key[len(folder) + 1:] if folder else key


def download_keys(client, bucket: str, keys: list[str], folder: str, local: Path, label: str) -> None:
    """Each key to its path below ``folder`` under ``local``; every target is checked before anything is
    downloaded, so a key that would land outside ``local`` ('..', a leading '/') leaves nothing behind."""
    targets = {key: path_inside(local, relative_key(key, folder), f"{label}: object key {key!r}",
                                "; the key leaves the prefix: rename the object") for key in keys}
    for key, target in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(target))
