"""Definitions remembered by what they are made of: building one with the SDK takes seconds, reading it back none.

:func:`definition_key` hashes the config, the target, the step code, the modules that build a definition and the
SDK's version; the definition and a copy of every code object it points to are kept under the flanops home, so
a rerun after embedded AWS restarted puts the code back in S3 instead of building again.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from .code_locations import CODE_PREFIX, code_bundle, put_if_absent
from .config import PipelineConfig


def definition_key(config: PipelineConfig, role_arn: str, bucket: str, region: str) -> str:
    """What a definition is made of: the config, the target, the step code, this module and the SDK's version."""
    from importlib.metadata import version

    from stepkit.wheels import cache_dir, runtime_version

    digest = hashlib.sha256()
    settings = {"pipeline_name": config.pipeline_name, "parameters": config.parameter_values(), "steps": config.steps,
                "images": config.images.model_dump(), "security": config.security.model_dump(),
                "cache_expire_after": config.cache_expire_after, "max_retries": config.max_retries}
    made_of = {"config": settings, "role": role_arn, "bucket": bucket,
               "region": region, "code": code_bundle()[1], "sagemaker": version("sagemaker"),
               "runtime": runtime_version(),
               # a definition built while no wheel could be fetched has none: not the one to reuse once it can
               "wheels": sorted(path.name for path in cache_dir().glob("*/*.whl")),
               "builder": [hashlib.sha256(Path(__file__).with_name(name).read_bytes()).hexdigest()
                           for name in ("definition.py", "code_locations.py", "config.py", "tables.py")]}
    digest.update(json.dumps(made_of, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def definitions_dir() -> Path:
    from .home import flanops_home

    return flanops_home() / "definitions"


def remember_definition(key: str, text: str, s3, bucket: str, pipeline_name: str) -> None:
    """Keep ``text`` and a copy of every code object it points to (content-addressed, so each is kept once)."""
    from .files import write_bytes_atomic, write_json_atomic

    objects_dir = definitions_dir() / "objects"
    objects_dir.mkdir(parents=True, exist_ok=True)
    objects = {}
    for prefix in sorted(set(re.findall(rf"s3://{re.escape(bucket)}/({re.escape(pipeline_name)}/{CODE_PREFIX}/[^\"]+)",
                                        text))):
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                body = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
                digest = hashlib.sha256(body).hexdigest()
                if not (objects_dir / digest).is_file():
                    write_bytes_atomic(objects_dir / digest, body)
                objects[item["Key"]] = digest
    write_json_atomic(definitions_dir() / f"{key}.json", {"definition": text, "bucket": bucket, "objects": objects})


def remembered_definition(key: str, s3, bucket: str) -> str | None:
    """The remembered definition for ``key``, its code objects put back where missing; None if there is none."""
    path = definitions_dir() / f"{key}.json"
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        copies = {name: definitions_dir() / "objects" / digest for name, digest in entry["objects"].items()}
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    if entry.get("bucket") != bucket or not all(copy.is_file() for copy in copies.values()):
        return None
    for name, copy in copies.items():
        put_if_absent(s3, bucket, name, copy.read_bytes)
    return entry["definition"]
