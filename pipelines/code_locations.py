"""Where a definition's code lives: content-addressed S3 locations, so an unchanged pipeline yields the same bytes.

Our step scripts go up as one reproducible ``sourcedir.tar.gz`` (:func:`code_bundle`); what the SDK uploads under
per-build names (its drivers, ``install_requirements.py``) is moved to ``<pipeline>/code/<sha256>/…``
(:func:`content_address`). The step scripts share one bundle (they share stepkit), so changing any of them
changes every job's arguments and so its cache key.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import re
import tarfile
from pathlib import Path
from typing import Any, Callable

from .step_scripts import steps_dir
from .s3 import split_s3_uri

CODE_PREFIX = "code"                     # <pipeline>/code/<sha256>/… holds every code location
CODE_INPUTS = {"code", "entrypoint", "aux", "sm_drivers"}   # job inputs that carry code, not data


def is_bytecode(relative_path: str) -> bool:
    """A compiled file: written by whichever Python ran the code, so it differs between machines and venvs."""
    return "__pycache__" in relative_path.split("/") or relative_path.endswith((".pyc", ".pyo"))


def code_bundle(folder: Path | None = None) -> tuple[bytes, str]:
    """``sourcedir.tar.gz`` of the step scripts, byte-for-byte the same for the same files.

    Sorted names, zero mtimes/owners and a zero gzip timestamp: the SDK's own packaging stamps
    the time, which would change the definition (and miss every cache) on each build.
    """
    folder = folder or steps_dir()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not is_bytecode(p.relative_to(folder).as_posix()))
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in files:
            info = tarfile.TarInfo(path.relative_to(folder).as_posix())
            data = path.read_bytes()
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    packed = io.BytesIO()
    with gzip.GzipFile(fileobj=packed, mode="wb", mtime=0, filename="") as gz:
        gz.write(raw.getvalue())
    body = packed.getvalue()
    return body, hashlib.sha256(body).hexdigest()


def upload_code(s3, bucket: str, pipeline_name: str) -> str:
    """Upload the step scripts once per content; returns the ``sourcedir.tar.gz`` S3 URI."""
    body, digest = code_bundle()
    key = f"{pipeline_name}/{CODE_PREFIX}/{digest}/sourcedir.tar.gz"
    put_if_absent(s3, bucket, key, body)
    return f"s3://{bucket}/{key}"


def upload_serving_wheel(s3, bucket: str, pipeline_name: str, serving_python: str) -> str | None:
    """Stage the serving runtime's wheel (stepkit/wheels.py) under a content key; returns its folder's S3 URI.

    Fetched here, on the client, so that the Evaluate job packs it into model.tar.gz without
    network access of its own (a job in a VPC or with network isolation has none). None, with a
    warning, where it cannot be fetched (no package index reachable and none cached).
    """
    from stepkit.errors import StepError
    from stepkit.wheels import runtime_wheel

    try:
        wheel = runtime_wheel(serving_python)
    except StepError as err:
        print(f"warning: {err}. A ct2-int8 model will be packaged without it and its endpoint will install "
              "CTranslate2 from the package index when it starts: it cannot serve in a network-isolated stage "
              "(the shipped staging and prod) until you run again where the index is reachable")
        return None
    body = wheel.read_bytes()
    key = f"{pipeline_name}/{CODE_PREFIX}/{hashlib.sha256(body).hexdigest()}/wheels"
    put_if_absent(s3, bucket, f"{key}/{wheel.name}", body)
    return f"s3://{bucket}/{key}"


def image_python(image_uri: str) -> str:
    """``…huggingface-pytorch-inference:2.6.0-transformers4.51.3-cpu-py312-ubuntu22.04`` → ``3.12``."""
    found = re.search(r"-py(\d)(\d+)-", image_uri)
    if not found:
        raise ValueError(f"cannot tell the Python version of image {image_uri}: expected a '-pyXY-' tag")
    return f"{found.group(1)}.{found.group(2)}"


def put_if_absent(s3, bucket: str, key: str, body: bytes | Callable[[], bytes]) -> None:
    """Upload ``body`` (or what calling it returns: read only when needed) unless ``key`` exists."""
    from botocore.exceptions import ClientError

    try:
        s3.head_object(Bucket=bucket, Key=key)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
            raise
        s3.put_object(Bucket=bucket, Key=key, Body=body() if callable(body) else body)


def content_address(definition: dict, s3, pipeline_name: str) -> dict:
    """Move code the SDK uploaded under per-build names (timestamps, job names) to content keys.

    v3's ModelTrainer uploads its driver scripts (``sm_drivers``) and FrameworkProcessor its
    ``install_requirements.py`` (``aux``) under a fresh job name on every build. The copies go
    to ``<pipeline>/code/<sha256 of the files>/<name>`` and the definition points there.
    """
    for step in iter_steps(definition["Steps"]):
        arguments = step.get("Arguments", {})
        for item in arguments.get("ProcessingInputs", []):
            if item.get("InputName") in CODE_INPUTS and "S3Input" in item:
                item["S3Input"]["S3Uri"] = relocate(s3, item["S3Input"]["S3Uri"], pipeline_name, item["InputName"])
        for channel in arguments.get("InputDataConfig", []):
            source = channel.get("DataSource", {}).get("S3DataSource")
            if channel.get("ChannelName") in CODE_INPUTS and source:
                source["S3Uri"] = relocate(s3, source["S3Uri"], pipeline_name, channel["ChannelName"])
    return definition


def relocate(s3, uri: Any, pipeline_name: str, name: str) -> Any:
    if not isinstance(uri, str):
        return uri
    bucket, key = split_s3_uri(uri)
    if key.startswith(f"{pipeline_name}/{CODE_PREFIX}/"):
        return uri   # already content-addressed (our bundle, the SDK's hashed runproc.sh)
    prefix = key.rstrip("/")
    objects = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        objects += [obj["Key"] for obj in page.get("Contents", [])]
    if not objects:
        raise RuntimeError(f"the SDK uploaded nothing to {uri} for the {name!r} input")
    single_object = objects == [prefix]
    base = prefix.rsplit("/", 1)[0] if single_object else prefix
    # The SDK uploads its drivers' folder with the __pycache__ of the venv it is installed in: left out, the
    # same SDK version gives the same code location (and definition) on every machine.
    relatives = {obj: obj[len(base):].lstrip("/") for obj in sorted(objects)}
    files = {relative: s3.get_object(Bucket=bucket, Key=obj)["Body"].read()
             for obj, relative in relatives.items() if single_object or not is_bytecode(relative)}
    digest = hashlib.sha256()
    for relative, body in sorted(files.items()):
        digest.update(relative.encode() + b"\0" + hashlib.sha256(body).digest())
    target = f"{pipeline_name}/{CODE_PREFIX}/{digest.hexdigest()}/{name}"
    for relative, body in files.items():
        put_if_absent(s3, bucket, f"{target}/{relative}", body)
    if single_object:
        return f"s3://{bucket}/{target}/{next(iter(files))}"
    return f"s3://{bucket}/{target}" + ("/" if uri.endswith("/") else "")


def iter_steps(steps: list[dict]):
    """Every step, including those inside ConditionStep branches."""
    for step in steps:
        yield step
        if step.get("Type") == "Condition":
            yield from iter_steps(step["Arguments"].get("IfSteps", []))
            yield from iter_steps(step["Arguments"].get("ElseSteps", []))
