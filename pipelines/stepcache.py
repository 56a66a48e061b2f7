"""The step cache: a job whose resolved arguments are unchanged reuses an earlier run's outputs.

Code locations are content-addressed, so a change to a step's code changes its key. A hit whose
outputs are gone from S3 (embedded AWS restarted) is restored from the job's own local copy when
that copy still holds exactly what the job wrote; otherwise the job runs again.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

from .expressions import Context
from .files import write_json_atomic
from .functionstep import RESULTS, function_results_uri
from .jobs import output_encryption
from .records import utcnow
from .s3 import prefix_exists, split_s3_uri, upload_folder
from .transform import TRANSFORM_OUTPUT

PLACEHOLDER_EXECUTION = "<execution-id>"   # stands in for the execution id in cache keys


DEFAULT_EXPIRY = timedelta(days=30)   # when CacheConfig gives no ExpireAfter
DURATION = re.compile(r"P(?:(\d+)W)?(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?", re.IGNORECASE)


def parse_duration(text: str | None) -> timedelta | None:
    """ISO 8601 durations as CacheConfig's ExpireAfter uses them (P30D, PT12H, P1W, p30d); None if not one."""
    match = DURATION.fullmatch(text or "")
    if not match or text.upper() in ("P", "PT") or text.upper().endswith("T"):
        return None
    weeks, days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return timedelta(weeks=weeks, days=days, hours=hours, minutes=minutes, seconds=seconds)


@dataclass
class StepCache:
    """One pipeline's cache entries under the flanops home, one JSON file per step and key."""

    folder: Path
    s3: Any
    echo: Callable[[str], None] = print

    def path(self, name: str, key: str) -> Path:
        return self.folder / name / f"{key}.json"

    @staticmethod
    def key(step: dict, ctx: Context) -> str:
        """What the step's outputs depend on: its type, its arguments resolved without the execution id."""
        name = step["Name"]
        key_ctx = replace(ctx, execution_id=PLACEHOLDER_EXECUTION, execution_arn=PLACEHOLDER_EXECUTION)
        key_source = {"Type": step["Type"], "Arguments": key_ctx.resolve(step["Arguments"], name),
                      "PropertyFiles": step.get("PropertyFiles", [])}
        return hashlib.sha256(json.dumps(key_source, sort_keys=True, default=str).encode()).hexdigest()

    def store(self, name: str, key: str, ctx: Context, properties: dict, files: dict, sandbox: Path,
              metadata: dict | None = None) -> None:
        """``metadata``: the step's record metadata; a hit shows the job it reuses (``TrainingJob: {Arn}``), as
        SageMaker lists a cached step, which is how the SDK finds a function step's result."""
        jobs = {kind: value for kind, value in (metadata or {}).items() if kind.endswith("Job")}
        write_json_atomic(self.path(name, key), {
            "CreationTime": utcnow(), "SourcePipelineExecutionArn": ctx.execution_arn, "Metadata": jobs,
            "Properties": properties, "PropertyFiles": files, "LocalCopies": local_copies(properties, sandbox)})

    def reuse(self, name: str, key: str, cache: dict, ctx: Context, entry: dict) -> bool:
        """Fill ``ctx`` with a hit's properties and mark ``entry`` a cache hit; False when there is none."""
        path = self.path(name, key)
        if not path.is_file():
            return False
        hit = json.loads(path.read_text(encoding="utf-8"))
        age = datetime.now(timezone.utc) - datetime.fromisoformat(hit["CreationTime"])
        expiry = parse_duration(cache.get("ExpireAfter"))
        if age >= (DEFAULT_EXPIRY if expiry is None else expiry):   # PT0S: never reused
            return False
        missing = [uri for uri in output_uris(hit["Properties"]) if not prefix_exists(self.s3, uri)]
        if missing:   # the earlier outputs are gone (embedded AWS restarted): restore them, or run again
            copies = hit.get("LocalCopies", {})
            if not all(copy_is_intact(copies.get(uri)) for uri in missing):
                return False
            for uri in missing:
                restore_copy(self.s3, copies[uri], uri, output_encryption(hit["Properties"]))
            self.echo(f"    restored {len(missing)} output(s) to S3 from the local copy in {copies[missing[0]]['path']}")
        ctx.properties[name] = hit["Properties"]
        for file_name, document in hit["PropertyFiles"].items():
            ctx.property_files[f"{name}.{file_name}"] = document
        entry["CacheHitResult"] = {"SourcePipelineExecutionArn": hit["SourcePipelineExecutionArn"]}
        entry["Metadata"].update(hit.get("Metadata", {}))
        self.echo(f"    cache hit: reusing the outputs of {hit['SourcePipelineExecutionArn'].rsplit('/', 1)[-1]}")
        return True


def output_locations(properties: dict, sandbox: Path) -> dict[str, Path]:
    """Each S3 location a job's outputs went to → the job's own copy of it in its sandbox: a processing
    job's outputs, a training job's model.tar.gz, a transform's .out objects, a function step's return."""
    copies = {item["S3Output"]["S3Uri"]: sandbox / item["S3Output"]["LocalPath"].lstrip("/")
              for item in properties.get("ProcessingOutputConfig", {}).get("Outputs", [])}
    artifact = properties.get("ModelArtifacts", {}).get("S3ModelArtifacts")
    if artifact:
        copies[artifact] = sandbox / "model.tar.gz"
    transformed = properties.get("TransformOutput", {}).get("S3OutputPath")
    if transformed:
        copies[transformed] = sandbox / TRANSFORM_OUTPUT
    results = function_results_uri(properties)
    if results:
        copies[results] = sandbox / RESULTS
    return copies


def local_copies(properties: dict, sandbox: Path) -> dict[str, dict]:
    """Each output's S3 location → the job's own copy of it in the run folder, with each file's size."""
    return {uri: {"path": str(path), "files": file_sizes(path)}
            for uri, path in output_locations(properties, sandbox).items() if path.exists()}


def file_sizes(path: Path) -> dict[str, int]:
    if path.is_file():
        return {"": path.stat().st_size}
    return {p.relative_to(path).as_posix(): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


def copy_is_intact(copy: dict | None) -> bool:
    """True when the local copy still holds exactly the files the job wrote (a later edit is not an output)."""
    return bool(copy) and Path(copy["path"]).exists() and file_sizes(Path(copy["path"])) == copy["files"]


def restore_copy(s3, copy: dict, uri: str, extra_args: dict | None = None) -> None:
    path = Path(copy["path"])
    if path.is_file():
        bucket, key = split_s3_uri(uri)
        s3.upload_file(str(path), bucket, key, ExtraArgs=extra_args)
    else:
        upload_folder(s3, path, uri, extra_args)


def output_uris(properties: dict) -> list[str]:
    """The S3 locations a job's outputs went to (what a cache hit needs to still exist)."""
    return list(output_locations(properties, Path()))
