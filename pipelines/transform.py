"""A ``Transform`` step: batch transform of an S3 prefix through the model's own ``code/inference.py``.

As SageMaker batch transform does with the model's serving container. The model (ModelName: made
by a CreateModel step, or already in the target's SageMaker) points at a ``model.tar.gz`` holding
``code/inference.py``; it is loaded as the local endpoint loads it (infra/serving.py's
``fetch_model_data`` and ``LoadedModel``: the same extraction, handler import, ``model_fn`` and
per-request ``input_fn`` → ``predict_fn`` → ``output_fn``), with the model's and the job's
Environment. Every object under the input prefix is sent with the job's ContentType and Accept:
SplitType ``Line`` sends each line as one request (empty lines are skipped), ``None`` the whole
object. Each input's answers land in ``<input>.out`` under ``TransformOutput.S3OutputPath``,
keeping the input's path below the prefix; AssembleWith ``Line`` ends every record's answer with
a newline, ``None`` concatenates them. A record over MaxPayloadInMB (default 6) or an error
answer fails the job, as on SageMaker; BatchStrategy MultiRecord sends one record per request here.

The handler runs in a process of its own (``python -m flanops.pipelines.transform SPEC``) under
jobs.py's process contract: its output streams to the job's ``job.log``, a handler that crashes
fails the step with that log, and the outputs reach S3 only when every record succeeded. Refused
in one line: ManifestFile inputs, RecordIO/TFRecord splits, compression other than Gzip, and
DataProcessing filters or joins.
"""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from typing import Callable

from .errors import FlanopsError
from .failures import StepFailed
from .files import write_json_atomic
from .jobs import JobRunner, output_encryption
from .s3 import download_prefix, upload_folder

TRANSFORM_INPUT = "input"      # the sandbox's copy of the input prefix
TRANSFORM_OUTPUT = "output"    # the .out objects, uploaded to S3OutputPath (the step cache's local copy)
MODEL_DIR = "opt/ml/model"     # the extracted model.tar.gz, where SageMaker puts it
DEFAULT_MAX_PAYLOAD_MB = 6


def transform_settings(name: str, arguments: dict) -> dict:
    """The job's request as the child process uses it; what the local executor cannot do is refused."""
    source = arguments["TransformInput"]["DataSource"]["S3DataSource"]
    inputs, outputs = arguments["TransformInput"], arguments["TransformOutput"]
    refusals = {"S3DataType": (source.get("S3DataType", "S3Prefix"), ("S3Prefix",)),
                "SplitType": (inputs.get("SplitType", "None"), ("None", "Line")),
                "CompressionType": (inputs.get("CompressionType", "None"), ("None", "Gzip")),
                "AssembleWith": (outputs.get("AssembleWith", "None"), ("None", "Line"))}
    for setting, (value, supported) in refusals.items():
        if value not in supported:
            raise StepFailed(f"{name}: {setting} {value} is not supported by the local executor "
                             f"(it runs {' or '.join(supported)})")
    processing = {key: value for key, value in (arguments.get("DataProcessing") or {}).items()
                  if value not in (None, "$", "None")}
    if processing:
        raise StepFailed(f"{name}: DataProcessing {processing} (input/output filters, joins) is not supported by "
                         "the local executor")
    megabytes = int(arguments.get("MaxPayloadInMB", DEFAULT_MAX_PAYLOAD_MB))
    return {"content_type": inputs.get("ContentType") or "", "accept": outputs.get("Accept") or "",
            "split_type": inputs.get("SplitType", "None"), "gzip": inputs.get("CompressionType") == "Gzip",
            "assemble_with": outputs.get("AssembleWith", "None"),
            "max_payload_bytes": megabytes * 1024 * 1024 if megabytes > 0 else None}


def stage_model(jobs: JobRunner, name: str, model_name: str, sandbox: Path) -> tuple[Path, dict]:
    """The model's artifact extracted into the sandbox as the endpoint server extracts it, and its Environment."""
    from botocore.exceptions import ClientError

    from flanops.infra.serving import check_artifact, fetch_model_data

    try:
        described = jobs.session.client("sagemaker").describe_model(ModelName=model_name)
    except ClientError as err:
        raise StepFailed(f"{name}: model {model_name!r}: {err.response['Error'].get('Message') or err}") from None
    container = described.get("PrimaryContainer") or next(iter(described.get("Containers") or []), {})
    source = (container.get("ModelDataSource") or {}).get("S3DataSource") or {}
    target = sandbox / MODEL_DIR
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        if container.get("ModelDataUrl"):
            model_dir = fetch_model_data(container["ModelDataUrl"], jobs.session, target.parent)
        elif source.get("S3Uri") and source.get("CompressionType") == "None":
            download_prefix(jobs.s3, source["S3Uri"], target)
            model_dir = check_artifact(target, source["S3Uri"])
        else:
            raise StepFailed(f"{name}: model {model_name!r} has no model data (ModelDataUrl) to transform with")
    except FlanopsError as err:
        raise StepFailed(f"{name}: model {model_name!r}: {err}") from None
    return model_dir, container.get("Environment") or {}


def run_transform(jobs: JobRunner, name: str, job_name: str, arguments: dict, sandbox: Path, entry: dict,
                  started: Callable[[], None]) -> dict:
    """One transform job, as jobs.py runs a processing job; returns its properties (DescribeTransformJob)."""
    settings = transform_settings(name, arguments)
    jobs.fresh_sandbox(sandbox)
    arn = jobs.job_arn("transform-job", job_name)
    entry["Metadata"]["TransformJob"] = {"Arn": arn}   # first, as SageMaker lists a step's metadata
    model_dir, model_environment = stage_model(jobs, name, arguments["ModelName"], sandbox)
    inputs, outputs = sandbox / TRANSFORM_INPUT, sandbox / TRANSFORM_OUTPUT
    download_prefix(jobs.s3, arguments["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"], inputs)
    outputs.mkdir()
    spec = sandbox / "transform.json"
    write_json_atomic(spec, {**settings, "model_dir": str(model_dir), "input_dir": str(inputs),
                             "output_dir": str(outputs)})
    env = jobs.container_env(sandbox, job_name, {**model_environment, **(arguments.get("Environment") or {})})
    jobs.run_process(name, [sys.executable, "-u", "-m", "flanops.pipelines.transform", str(spec)], sandbox, env,
                     sandbox, entry, started)
    upload_folder(jobs.s3, outputs, arguments["TransformOutput"]["S3OutputPath"], output_encryption(arguments))
    arn = jobs.record_job("CreateTransformJob", name, job_name, arguments)   # DescribeTransformJob finds it
    entry["Metadata"]["TransformJob"]["Arn"] = arn
    return {**arguments, "TransformJobName": job_name, "TransformJobArn": arn, "TransformJobStatus": "Completed"}


# ----------------------------------------------------------------------------- the job's own process
def records_of(data: bytes, split_type: str) -> list[bytes]:
    """What SageMaker sends as requests: each non-empty line (Line), or the whole object (None)."""
    if split_type == "Line":
        return [line.rstrip(b"\r") for line in data.split(b"\n") if line.rstrip(b"\r")]
    return [data]


def transform_file(model, path: Path, label: str, settings: dict) -> bytes:
    """One input object through the handler: its assembled answers; SystemExit(1) on the first failed record."""
    data = path.read_bytes()
    if settings["gzip"]:
        data = gzip.decompress(data)
    answers = []
    limit = settings["max_payload_bytes"]
    for index, record in enumerate(records_of(data, settings["split_type"]), 1):
        if limit is not None and len(record) > limit:
            print(f"error: {label} record {index} is {len(record):,} bytes, over MaxPayloadInMB ({limit:,} bytes)")
            raise SystemExit(1)
        reply = model.invoke(record, settings["content_type"], settings["accept"])
        if reply.status != 200:
            message = json.loads(reply.body).get("error", reply.body.decode(errors="replace"))
            print(f"error: {label} record {index}: the model answered {reply.status}: {message}")
            raise SystemExit(1)
        answers.append(reply.body)
    separator = b"\n" if settings["assemble_with"] == "Line" else b""
    return b"".join(answer + separator for answer in answers)


def main(argv: list[str] | None = None) -> int:
    """The transform job's process: load the model through its handler, answer every input object."""
    settings = json.loads(Path((argv or sys.argv[1:])[0]).read_text(encoding="utf-8"))
    from flanops.infra.serving import LoadedModel

    try:
        model = LoadedModel(Path(settings["model_dir"]))   # import code/inference.py, then model_fn once
    except FlanopsError as err:
        print(f"error: {err}")
        return 1
    inputs, outputs = Path(settings["input_dir"]), Path(settings["output_dir"])
    for path in sorted(p for p in inputs.rglob("*") if p.is_file()):
        label = path.relative_to(inputs).as_posix()
        target = outputs / f"{label}.out"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(transform_file(model, path, label, settings))
        print(f"{label} -> {label}.out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
