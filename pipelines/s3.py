"""S3 URIs and transfers for the client side (the step scripts ship alone, with their own)."""
from __future__ import annotations

from pathlib import Path

from .errors import FlanopsError
from .failures import StepFailed


def split_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"not an S3 URI: {uri!r}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` → ``("bucket", "a/b")``; a user's URI, so a bad one is a FlanopsError."""
    try:
        bucket, key = split_s3_uri(uri)
    except ValueError:
        bucket = key = ""
    if not bucket:
        raise FlanopsError(f"{uri!r} is not an s3://bucket/key URI")
    return bucket, key.rstrip("/")


def download_prefix(s3, uri: str, target: Path) -> int:
    """S3Prefix semantics: the object itself (kept by its name) or every object below the prefix."""
    bucket, key = split_s3_uri(uri)
    prefix = key.rstrip("/")
    target.mkdir(parents=True, exist_ok=True)
    count = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if obj["Key"] == prefix:
                relative = prefix.rsplit("/", 1)[-1]
            elif obj["Key"].startswith(prefix + "/") or not prefix:
                relative = obj["Key"][len(prefix):].lstrip("/")
            else:
                continue   # a sibling that merely shares the prefix text (data vs data2)
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(destination))
            count += 1
    if count == 0:
        raise StepFailed(f"nothing in S3 at {uri}")
    return count


def upload_folder(s3, folder: Path, uri: str, extra_args: dict | None = None) -> int:
    bucket, key = split_s3_uri(uri)
    count = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        s3.upload_file(str(path), bucket, f"{key.rstrip('/')}/{path.relative_to(folder).as_posix()}",
                       ExtraArgs=extra_args)
        count += 1
    return count


def prefix_exists(s3, uri: str) -> bool:
    bucket, key = split_s3_uri(uri)
    try:
        return bool(s3.list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/"), MaxKeys=1).get("Contents"))
    except Exception:   # a bucket that is gone (embedded AWS restarted) is simply a cache miss
        return False
