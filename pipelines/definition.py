"""The lifecycle as one SageMaker Model Building Pipeline (SDK v3). This module only wires steps.

    PrepareData → SelectModel → FineTuneLoRA ─┬─ OptimizeDistill  ─┐
                                               ├─ OptimizeQuantize ─┼→ Evaluate → QualityGate ─┬→ RegisterModel
                                               └─ OptimizePrune    ─┘                          └→ GateFailed

Each job's entry script is a file of ``steps/`` and the folder is its source_dir. The three
optimize branches always exist; a branch that ``OptimizationMethod`` does not choose writes a
SKIPPED marker and ends at once (``steps/optimize.py``), so ``auto`` runs all three in
parallel and Evaluate picks the variant to register. Evaluate writes ``evaluation.json``
(read by the gate through a PropertyFile) and the chosen model as ``model.tar.gz``.

Code locations are content-addressed (``<pipeline>/code/<sha256>/…``) so that an unchanged
pipeline yields a byte-identical definition. The step scripts share one bundle (they share
stepkit), so changing any of them changes every job's arguments and so its cache key.

SageMaker SDK v3 makes boto3 clients when imported: everything here imports it lazily, after
the caller has chosen the AWS (embedded or real) and the region.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import PipelineConfig, steps_dir
from .s3 import split_s3_uri
from .tables import GATE, STEPS, GateCondition

PROCESSING = "/opt/ml/processing"       # SageMaker's processing container contract
CHECKPOINTS = "/opt/ml/checkpoints"     # a training job's checkpoint folder, synced with its CheckpointConfig S3Uri
CODE_PREFIX = "code"                     # <pipeline>/code/<sha256>/… holds every code location
CODE_INPUTS = {"code", "entrypoint", "aux", "sm_drivers"}   # job inputs that carry code, not data
EVALUATION_REPORT = "EvaluationReport"
# The SDK's defaults config, given directly: no telemetry calls to the internet. (Pointing
# SAGEMAKER_USER_CONFIG_OVERRIDE at a file instead re-validates it per session: 4x slower builds.)
SDK_CONFIG = {"SchemaVersion": "1.0", "SageMaker": {"PythonSDK": {"Modules": {"TelemetryOptOut": True}}}}
VARIANTS = tuple(section for section, step in STEPS.items() if step.entry == "optimize")   # distill, quantize, prune



def gate_paths() -> dict[str, str]:
    """Where the gate reads evaluate.py's evaluation.json: each condition's metric, the flag that says whether it
    applies and that flag's note, and the variant judged."""
    flags = {c.applies_when for c in GATE if c.applies_when}
    return {**{condition.metric: f"metrics.{condition.metric}.value" for condition in GATE},
            **{flag: f"metrics.{flag}.value" for flag in flags},
            **{f"{flag}_note": f"metrics.{flag}.note" for flag in flags},
            "variant": "selected_variant"}


GATE_PATHS = gate_paths()


@dataclass(frozen=True)
class StepNames:
    prepare: str = STEPS["prepare"].name
    select: str = STEPS["select"].name
    finetune: str = STEPS["finetune"].name
    evaluate: str = STEPS["evaluate"].name
    gate: str = "QualityGate"
    register: str = "RegisterModel"
    fail: str = "GateFailed"

    @staticmethod
    def optimize(variant: str) -> str:
        return STEPS[variant].name


NAMES = StepNames()


# ----------------------------------------------------------------------------- code bundle
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


# ----------------------------------------------------------------------------- the pipeline
def wired_values(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` in the order of the flags STEPS lists as the definition's own for ``section``; it must give
    exactly those, so the table (which the config checks read) and the definition cannot drift apart."""
    passed = STEPS[section].passed
    if set(values) != set(passed):
        raise ValueError(f"steps.{section}: the definition wires {sorted(values)} but tables.STEPS lists "
                         f"{sorted(passed)}")
    return {name: values[name] for name in passed}


def wired_arguments(section: str, values: dict[str, Any]) -> list:
    """The flags the definition passes a step's script: None leaves a flag out, True gives it bare, a list repeats it."""
    arguments: list = []
    for name, value in wired_values(section, values).items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            arguments.append(flag)
        elif isinstance(value, list):
            arguments += [item for each in value for item in (flag, each)]
        elif value is not None:
            arguments += [flag, value]
    return arguments


def quiet_sdk() -> None:
    """The SDK logs every default it applies at INFO/DEBUG, through the root handler it installs.

    It sets its loggers' levels as its modules load, so this runs after the imports; our own
    progress lines say what matters.
    """
    import logging

    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] in ("sagemaker", "botocore", "boto3", "urllib3"):
            logging.getLogger(name).setLevel(logging.ERROR)
    for handler in logging.root.handlers:
        handler.setLevel(logging.WARNING)


def validate_sdk_config_once() -> None:
    """Make the SDK validate a config once, not on each of its ~120 lookups while a pipeline is built.

    sagemaker 3.x's ``get_sagemaker_config_value`` runs ``jsonschema.validate`` against its whole
    config schema on every call; the config (``SDK_CONFIG``) never changes, so the result is
    remembered by the config's JSON. A config that fails validation still raises every time.
    """
    import json as json_module

    from sagemaker.core.config.config_manager import SageMakerConfig

    validate = SageMakerConfig.validate_sagemaker_config
    if getattr(validate, "remembers_valid_configs", False):
        return
    valid: set[str] = set()

    def validate_once(sagemaker_config=None):
        key = json_module.dumps(sagemaker_config, sort_keys=True, default=str)
        if key not in valid:
            validate(sagemaker_config)
            valid.add(key)

    validate_once.remembers_valid_configs = True
    SageMakerConfig.validate_sagemaker_config = staticmethod(validate_once)


def job_images(config: PipelineConfig, region: str) -> dict[str, str]:
    """The Hugging Face images of the pipeline's processing and training jobs and of the registered model.

    Remembered per versions, region and SDK (in ``$FLANOPS_HOME/images.json``): importing the SDK to
    look them up costs seconds that a cached rerun would otherwise spend on nothing else.
    """
    from importlib.metadata import version

    images = config.images
    processing_instance_type = config.parameter_values()["ProcessingInstanceType"]
    key = json.dumps([images.model_dump(), region, processing_instance_type, version("sagemaker")], sort_keys=True)
    remembered_file = definitions_dir() / "images.json"
    try:
        remembered = json.loads(remembered_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        remembered = {}
    if isinstance(remembered, dict) and isinstance(remembered.get(key), dict):
        return remembered[key]
    from sagemaker.core import image_uris

    found = {
        "processing": image_uris.retrieve(
            "huggingface", region=region, version=images.processing_transformers,
            base_framework_version=f"pytorch{images.processing_pytorch}", instance_type=processing_instance_type,
            image_scope="inference"),
        "training": image_uris.retrieve(
            "huggingface", region=region, version=images.training_transformers,
            base_framework_version=f"pytorch{images.training_pytorch}", instance_type="ml.g5.xlarge",
            image_scope="training"),
        "inference": image_uris.retrieve(
            "huggingface", region=region, version=images.inference_transformers,
            base_framework_version=f"pytorch{images.inference_pytorch}",
            instance_type=images.inference_instance_types[0], image_scope="inference"),
    }
    from .files import write_json_atomic

    write_json_atomic(remembered_file, {**(remembered if isinstance(remembered, dict) else {}), key: found})
    return found


def get_pipeline(config: PipelineConfig, role_arn: str, default_bucket: str, session):
    """Build the pipeline. ``session`` is a boto3 Session bound to the target AWS and region."""
    from sagemaker.core.model_metrics import MetricsSource, ModelMetrics
    from sagemaker.core.network import NetworkConfig
    from sagemaker.core.processing import FrameworkProcessor
    from sagemaker.core.shapes import ProcessingInput, ProcessingOutput, ProcessingS3Input, ProcessingS3Output
    from sagemaker.core.workflow.conditions import (ConditionEquals, ConditionGreaterThanOrEqualTo,
                                                     ConditionLessThanOrEqualTo, ConditionOr)
    from sagemaker.core.workflow.execution_variables import ExecutionVariables
    from sagemaker.core.workflow.functions import Join, JsonGet
    from sagemaker.core.workflow.parameters import ParameterFloat, ParameterInteger, ParameterString
    from sagemaker.core.workflow.pipeline_context import PipelineSession
    from sagemaker.core.workflow.properties import PropertyFile
    from sagemaker.mlops.workflow.condition_step import ConditionStep
    from sagemaker.mlops.workflow.fail_step import FailStep
    from sagemaker.mlops.workflow.model_step import ModelStep
    from sagemaker.mlops.workflow.pipeline import Pipeline
    from sagemaker.mlops.workflow.retry import StepExceptionTypeEnum, StepRetryPolicy
    from sagemaker.mlops.workflow.steps import CacheConfig, ProcessingStep, TrainingStep
    from sagemaker.serve.model_builder import ModelBuilder
    from sagemaker.train import ModelTrainer
    from sagemaker.core.shapes import OutputDataConfig
    from sagemaker.train.configs import CheckpointConfig, Compute, InputData, Networking, SourceCode
    from sagemaker.train.distributed import Torchrun

    quiet_sdk()
    validate_sdk_config_once()
    region = session.region_name
    pipeline_session = PipelineSession(boto_session=session, default_bucket=default_bucket,
                                       sagemaker_config=SDK_CONFIG)
    name = config.pipeline_name
    values = config.parameter_values()
    kinds = {int: ParameterInteger, float: ParameterFloat, str: ParameterString}
    params = {key: kinds[type(value)](name=key, default_value=value) for key, value in values.items()}
    p = params.__getitem__

    source = upload_code(session.client("s3"), default_bucket, name)
    cache = CacheConfig(enable_caching=True, expire_after=config.cache_expire_after)
    # Capacity and throttling are worth retrying; a script's own error is not.
    retry = [StepRetryPolicy(exception_types=[StepExceptionTypeEnum.SERVICE_FAULT, StepExceptionTypeEnum.THROTTLING],
                             interval_seconds=30, backoff_rate=2.0, max_attempts=config.max_retries + 1)]
    images = config.images
    image_uri = job_images(config, region)
    processing_image, training_image, inference_image = (image_uri[use] for use in ("processing", "training", "inference"))

    # Security settings left unset stay out of the jobs' arguments, so the definition (and every
    # cache key) is the same as before for a config without them.
    security = config.security
    kms_key = security.kms_key_id
    network = {"enable_network_isolation": security.network_isolation or None,
               "security_group_ids": security.vpc.security_group_ids if security.vpc else None,
               "subnets": security.vpc.subnets if security.vpc else None}
    inter_container_encryption = security.encrypt_inter_container_traffic or None
    isolated_or_in_vpc = any(value is not None for value in (*network.values(), inter_container_encryption))
    processing_network = NetworkConfig(**network, encrypt_inter_container_traffic=inter_container_encryption) \
        if isolated_or_in_vpc else None
    training_network = Networking(**network, enable_inter_container_traffic_encryption=inter_container_encryption) \
        if isolated_or_in_vpc else None

    def s3_output(step: str, output: str):
        return Join(on="/", values=["s3:/", default_bucket, name, ExecutionVariables.PIPELINE_EXECUTION_ID, step, output])

    def processing_input(input_name: str, uri) -> Any:
        return ProcessingInput(input_name=input_name, s3_input=ProcessingS3Input(
            s3_uri=uri, local_path=f"{PROCESSING}/input/{input_name}", s3_data_type="S3Prefix", s3_input_mode="File"))

    def processing_output(step: str, output_name: str) -> Any:
        return ProcessingOutput(output_name=output_name, s3_output=ProcessingS3Output(
            s3_uri=s3_output(step, output_name), local_path=f"{PROCESSING}/output/{output_name}", s3_upload_mode="EndOfJob"))

    def output_uri(step, output_name: str):
        return step.properties.ProcessingOutputConfig.Outputs[output_name].S3Output.S3Uri

    def processing_step(section: str, arguments: list, inputs: list, outputs: list[str],
                        property_files: list | None = None) -> ProcessingStep:
        step_name, script = STEPS[section].name, STEPS[section].entry or STEPS[section].script
        processor = FrameworkProcessor(
            image_uri=processing_image, role=role_arn, instance_count=1, instance_type=p("ProcessingInstanceType"),
            command=["python3"], sagemaker_session=pipeline_session, base_job_name=f"{name}-{step_name}",
            output_kms_key=kms_key, volume_kms_key=kms_key, network_config=processing_network)
        step_args = processor.run(
            code=f"{script}.py", source_dir=source, job_name=f"{name}-{step_name}", inputs=inputs,
            outputs=[processing_output(step_name, output) for output in outputs], arguments=arguments)
        return ProcessingStep(name=step_name, step_args=step_args, cache_config=cache, retry_policies=retry,
                              property_files=property_files)

    prepare = processing_step(
        "prepare", [*wired_arguments("prepare", {"input": p("InputDataUri"), "output_dir": f"{PROCESSING}/output/data"}),
                    *config.step_arguments("prepare")],
        inputs=[], outputs=["data"])
    data_uri = output_uri(prepare, "data")

    select = processing_step(
        "select", [*wired_arguments("select", {"model": p("BaseModelId"), "output_dir": f"{PROCESSING}/output/model"}),
                   *config.step_arguments("select")],
        inputs=[], outputs=["model"])

    trainer = ModelTrainer(
        training_image=training_image, role=role_arn, sagemaker_session=pipeline_session,
        base_job_name=f"{name}-{NAMES.finetune}",
        source_code=SourceCode(source_dir=source, entry_script=f"{STEPS['finetune'].script}.py", requirements="requirements.txt"),
        # torchrun on one instance is a single process; on several it is SageMaker distributed training.
        distributed=Torchrun(),
        compute=Compute(instance_type=p("TrainingInstanceType"), instance_count=p("TrainingInstanceCount"),
                        **({"volume_kms_key_id": kms_key} if kms_key else {})),
        output_data_config=OutputDataConfig(s3_output_path=s3_output(NAMES.finetune, "model"),
                                            **({"kms_key_id": kms_key} if kms_key else {})),
        networking=training_network,
        # Per execution, so a retried or resumed execution's fine-tune resumes from its own last checkpoint.
        checkpoint_config=CheckpointConfig(s3_uri=s3_output(NAMES.finetune, "checkpoints"), local_path=CHECKPOINTS),
        # Hyperparameters and container arguments are strings in the API: numeric parameters join as text.
        hyperparameters={**{key.replace("_", "-"): value for key, value in wired_values("finetune", {
                             "lora_r": p("LoraRank").to_string(), "lora_alpha": p("LoraAlpha").to_string(),
                             "checkpoint_dir": CHECKPOINTS}).items()},
                         **{key.replace("_", "-"): value for key, value in config.steps.get("finetune", {}).items()}},
    )
    finetune = TrainingStep(
        name=NAMES.finetune, cache_config=cache, retry_policies=retry,
        step_args=trainer.train(input_data_config=[
            InputData(channel_name="data", data_source=data_uri),
            InputData(channel_name="model", data_source=output_uri(select, "model")),
        ]))
    finetuned_uri = finetune.properties.ModelArtifacts.S3ModelArtifacts

    model_flag = {"distill": "teacher_dir"}   # the model each branch optimizes: distill.py calls it the teacher
    optimize = {
        variant: processing_step(
            variant,
            ["--variant", variant, "--method", p("OptimizationMethod"), "--",
             *wired_arguments(variant, {model_flag.get(variant, "model_dir"): f"{PROCESSING}/input/model",
                                        "data_dir": f"{PROCESSING}/input/data",
                                        "output_dir": f"{PROCESSING}/output/model"}),
             *config.step_arguments(variant)],
            inputs=[processing_input("model", finetuned_uri), processing_input("data", data_uri)], outputs=["model"])
        for variant in VARIANTS
    }

    report = PropertyFile(name=EVALUATION_REPORT, output_name="evaluation", path="evaluation.json")
    serving_python = image_python(inference_image)
    from stepkit.wheels import NO_WHEEL_FLAG

    wheels_uri = upload_serving_wheel(session.client("s3"), default_bucket, name, serving_python)
    evaluate = processing_step(
        "evaluate",
        [*wired_arguments("evaluate", {
            "model_dir": f"{PROCESSING}/input/finetuned", "baseline_dir": f"{PROCESSING}/input/baseline",
            "data_dir": f"{PROCESSING}/input/data", "output_dir": f"{PROCESSING}/output/evaluation",
            "package_dir": f"{PROCESSING}/output/model",
            **{c.selects: p(c.parameter).to_string() for c in GATE if c.selects},
            "serving_python": serving_python,
            "wheelhouse": f"{PROCESSING}/input/wheels" if wheels_uri else None,
            NO_WHEEL_FLAG[2:].replace("-", "_"): None if wheels_uri else True,
            "compare": [f"{variant}={PROCESSING}/input/{variant}" for variant in VARIANTS]}),
         *config.step_arguments("evaluate")],
        inputs=[processing_input("finetuned", finetuned_uri), processing_input("baseline", output_uri(select, "model")),
                processing_input("data", data_uri), *([processing_input("wheels", wheels_uri)] if wheels_uri else []),
                *[processing_input(variant, output_uri(optimize[variant], "model")) for variant in VARIANTS]],
        outputs=["evaluation", "model"], property_files=[report])

    paths = gate_paths()

    def measured(path_name: str):
        return JsonGet(step_name=evaluate.name, property_file=report, json_path=paths[path_name])

    evaluation_uri = output_uri(evaluate, "evaluation")
    model_metrics = ModelMetrics(model_statistics=MetricsSource(
        s3_uri=Join(on="/", values=[evaluation_uri, "model_quality.json"]), content_type="application/json"))
    builder = ModelBuilder(image_uri=inference_image, s3_model_data_url=Join(on="/", values=[output_uri(evaluate, "model"),
                                                                                          "model.tar.gz"]),
                           role_arn=role_arn, sagemaker_session=pipeline_session)
    register = ModelStep(name=NAMES.register, step_args=builder.register(
        model_package_group_name=p("ModelPackageGroupName"), approval_status=p("ModelApprovalStatus"),
        content_types=["application/json", "text/plain"], response_types=["application/json"],
        inference_instances=images.inference_instance_types, transform_instances=images.inference_instance_types[:1],
        model_metrics=model_metrics, description=f"{name}: Flan-T5 + LoRA, optimized and gated",
        customer_metadata_properties={"variant": measured("variant"), "base_model": p("BaseModelId"),
                                      "optimization_method": p("OptimizationMethod")}))
    message = ["Quality gate failed for variant", measured("variant"), "-"]
    for index, condition in enumerate(GATE):
        message += [condition.label, measured(condition.metric), f"{condition.unit.strip()} ({condition.bound()}".lstrip(),
                    p(condition.parameter)]
        if condition.applies_when:   # "checked: the data records facts" or "skipped: …", as evaluate.py says
            message += ["—", measured(f"{condition.applies_when}_note")]
        message.append(")" + (";" if index < len(GATE) - 1 else ""))
    fail = FailStep(name=NAMES.fail, error_message=Join(on=" ", values=message))

    def gate_condition(condition: GateCondition):
        compare = (ConditionGreaterThanOrEqualTo if condition.at_least else ConditionLessThanOrEqualTo)(
            left=measured(condition.metric), right=p(condition.parameter))
        if condition.applies_when is None:
            return compare
        return ConditionOr(conditions=[ConditionEquals(left=measured(condition.applies_when), right=0), compare])

    gate = ConditionStep(name=NAMES.gate, conditions=[gate_condition(condition) for condition in GATE],
                         if_steps=[register], else_steps=[fail])

    return Pipeline(name=name, parameters=list(params.values()),
                    steps=[prepare, select, finetune, *optimize.values(), evaluate, gate],
                    sagemaker_session=pipeline_session)


def build_definition(config: PipelineConfig, role_arn: str, default_bucket: str, session) -> str:
    """The definition JSON a SageMaker user could upsert unchanged, stable across builds.

    Remembered by content (:func:`definition_key`): building with the SDK takes several seconds, and an
    unchanged config, code and target give the same bytes, so a rerun reads them back and only makes
    sure the code objects the definition points to are in S3 (embedded AWS may have been restarted).
    """
    import warnings

    s3 = session.client("s3")
    key = definition_key(config, role_arn, default_bucket, session.region_name)
    cached = remembered_definition(key, s3, default_bucket)
    if cached is not None:
        return cached
    with warnings.catch_warnings():
        # "Running within a PipelineSession…": expected, we only compile.
        warnings.simplefilter("ignore", UserWarning)
        pipeline = get_pipeline(config, role_arn, default_bucket, session)
        definition = json.loads(pipeline.definition())
    content_address(definition, s3, config.pipeline_name)
    text = json.dumps(definition, indent=2, sort_keys=True) + "\n"
    # keyed as it is now: building may have fetched the runtime wheel into the cache, which the key counts
    remember_definition(definition_key(config, role_arn, default_bucket, session.region_name), text, s3,
                        default_bucket, config.pipeline_name)
    return text


# ----------------------------------------------------------------------------- remembered definitions
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
                           for name in ("definition.py", "config.py", "tables.py")]}
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
