"""S3 URIs and transfers for the client side (prefix downloads are stepkit.s3's, which the step scripts ship with)."""
from __future__ import annotations

from pathlib import Path

from stepkit.errors import StepError
from stepkit.s3 import download_keys, prefix_keys

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
    """S3Prefix semantics: the object itself (kept by its name) or every object below the prefix, as the
    step scripts download (stepkit.s3); a key that would land outside ``target`` fails the step."""
    bucket, key = split_s3_uri(uri)
    folder, keys = prefix_keys(s3, bucket, key.rstrip("/"))
    target.mkdir(parents=True, exist_ok=True)
    if not keys:
        raise StepFailed(f"nothing in S3 at {uri}")
    try:
        download_keys(s3, bucket, keys, folder, target, uri)
    except StepError as err:
        raise StepFailed(str(err)) from None
    return len(keys)


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
