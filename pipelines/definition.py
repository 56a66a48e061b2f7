"""The lifecycle as one SageMaker Model Building Pipeline (SDK v3). This module only wires steps.

    PrepareData → SelectModel → FineTuneLoRA ─┬─ OptimizeDistill  ─┐
                                               ├─ OptimizeQuantize ─┼→ Evaluate → QualityGate ─┬→ RegisterModel
                                               └─ OptimizePrune    ─┘                          └→ GateFailed

Each job's entry script is a file of ``steps/`` and the folder is its source_dir. The three
optimize branches always exist; a branch that ``OptimizationMethod`` does not choose writes a
SKIPPED marker and ends at once (``steps/optimize.py``), so ``auto`` runs all three in
parallel and Evaluate picks the variant to register. Evaluate writes ``evaluation.json``
(read by the gate through a PropertyFile) and the chosen model as ``model.tar.gz``.

Code locations are content-addressed (``code_locations``) so that an unchanged pipeline yields a
byte-identical definition, and a built definition is remembered by what it is made of (``remembered``).

SageMaker SDK v3 makes boto3 clients when imported: everything here imports it lazily, after
the caller has chosen the AWS (embedded or real) and the region.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .code_locations import content_address, image_python, upload_code, upload_serving_wheel
from .config import PipelineConfig
from .remembered import definition_key, definitions_dir, remember_definition, remembered_definition
from .tables import GATE, STEPS, GateCondition

PROCESSING = "/opt/ml/processing"       # SageMaker's processing container contract
CHECKPOINTS = "/opt/ml/checkpoints"     # a training job's checkpoint folder, synced with its CheckpointConfig S3Uri
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
