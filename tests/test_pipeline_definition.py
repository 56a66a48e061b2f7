"""The pipeline definition JSON, checked without running it: against botocore's API shapes, its own
references, the published definition schema, the shipped config, evaluate.py's report, and
byte-for-byte stability. Plus the CLI's refusals of bad input before anything starts.

The definition is built once per module inside moto's in-process ``mock_aws`` (no server, no
subprocess): the SDK only uploads code to S3 while compiling, and nothing else touches AWS.
"""
from __future__ import annotations

import json
import re
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import botocore.session
import pytest
import yaml
from botocore.validate import ParamValidator

from conftest import mocked_aws
from flanops.pipelines import cli
from flanops.pipelines import definition as definition_module
from flanops.pipelines.config import ConfigError, Parameters, config_dir, load_config, shipped_configs
from flanops.pipelines.step_scripts import import_step
from flanops.pipelines import code_locations, remembered
from flanops.pipelines.code_locations import CODE_INPUTS, iter_steps
from flanops.pipelines.definition import EVALUATION_REPORT, GATE, GATE_PATHS, NAMES, build_definition
from flanops.pipelines.expressions import json_path
from flanops.pipelines.tables import STEPS

REPO = Path(__file__).resolve().parent.parent
SCHEMA = REPO.parent / "shared" / "data" / "sagemaker" / "pipeline-definition.schema.json"
REGION = "us-east-1"
BUCKET = "flanops-definition-test"
ROLE_ARN = "arn:aws:iam::123456789012:role/flanops-test"

EXPRESSIONS = ("Get", "Std:Join", "Std:JsonGet")
# The API each job step's Arguments become a request of (what SageMaker Pipelines calls).
OPERATIONS = {"Processing": "CreateProcessingJob", "Training": "CreateTrainingJob",
              "RegisterModel": "CreateModelPackage"}
# Required request members that SageMaker Pipelines fills in itself when it starts the job: the SDK
# leaves the job name out of a step's Arguments (the service names jobs after the execution, e.g.
# pipelines-<execution id>-<step>-<hash>), so a placeholder stands in for it before validating.
SERVICE_SUPPLIED = {"CreateProcessingJob": {"ProcessingJobName": "pipelines-placeholder-PrepareData"},
                    "CreateTrainingJob": {"TrainingJobName": "pipelines-placeholder-FineTuneLoRA"},
                    "CreateModelPackage": {}}
# What a step's properties are read from (``Get: Steps.X.<path>``): the Describe* response of its job.
DESCRIBE = {"Processing": "DescribeProcessingJob", "Training": "DescribeTrainingJob",
            "RegisterModel": "DescribeModelPackage"}
EXECUTION_VARIABLES = {"PipelineExecutionId", "PipelineExecutionArn", "PipelineName", "StartDateTime",
                       "CurrentDateTime"}

EXPECTED_STEPS = [("PrepareData", "Processing"), ("SelectModel", "Processing"), ("FineTuneLoRA", "Training"),
                  ("OptimizeDistill", "Processing"), ("OptimizeQuantize", "Processing"),
                  ("OptimizePrune", "Processing"), ("Evaluate", "Processing"), ("QualityGate", "Condition")]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def aws():
    """An in-process mocked AWS with a bucket (conftest.mocked_aws) and a definition builder."""
    with mocked_aws(REGION, BUCKET) as session:
        yield SimpleNamespace(session=session, build=lambda config=None: build_definition(
            config or load_config(), ROLE_ARN, BUCKET, session))


@pytest.fixture(scope="module")
def text(aws) -> str:
    return aws.build()


@pytest.fixture(scope="module")
def definition(text) -> dict:
    return json.loads(text)


@pytest.fixture(scope="module")
def steps(definition) -> dict[str, dict]:
    """Every step by name, including those inside the condition's branches."""
    return {step["Name"]: step for step in iter_steps(definition["Steps"])}


@pytest.fixture(scope="module")
def sagemaker_model():
    return botocore.session.get_session().get_service_model("sagemaker")


# ----------------------------------------------------------------------------- helpers
def is_expression(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in EXPRESSIONS


def placeholder(shape) -> Any:
    """A value of the type ``shape`` wants, long enough for its minimum length or value."""
    minimum = shape.metadata.get("min", 0)
    kind = shape.type_name
    if kind == "string":
        return "placeholder".ljust(int(minimum), "x")
    if kind in ("integer", "long"):
        return max(1, int(minimum))
    if kind in ("float", "double"):
        return max(1.0, float(minimum))
    if kind == "boolean":
        return True
    if kind == "timestamp":
        return "2020-12-01T00:00:00Z"
    if kind == "blob":
        return b"placeholder"
    return None   # an expression cannot stand for a structure, list or map: left for the validator to flag


def with_placeholders(value: Any, shape) -> Any:
    """``value`` with every pipeline expression replaced by a placeholder of the member's type.

    Keys the shape does not know are kept as they are, so the validator reports them.
    """
    if is_expression(value):
        stand_in = placeholder(shape)
        return value if stand_in is None else stand_in
    if shape.type_name == "structure" and isinstance(value, dict):
        return {key: with_placeholders(item, shape.members[key]) if key in shape.members else item
                for key, item in value.items()}
    if shape.type_name == "list" and isinstance(value, list):
        return [with_placeholders(item, shape.member) for item in value]
    if shape.type_name == "map" and isinstance(value, dict):
        return {key: with_placeholders(item, shape.value) for key, item in value.items()}
    return value


def request_problems(step: dict, sagemaker_model) -> str:
    """What botocore's validator says about the step's Arguments as a request of its API ('' if nothing)."""
    operation = OPERATIONS[step["Type"]]
    shape = sagemaker_model.operation_model(operation).input_shape
    request = {**SERVICE_SUPPLIED[operation], **with_placeholders(step["Arguments"], shape)}
    report = ParamValidator().validate(request, shape)
    return report.generate_report() if report.has_errors() else ""


def gets(value: Any) -> list[str]:
    """Every ``Get`` reference in ``value``, also those inside Std:Join and Std:JsonGet."""
    if isinstance(value, dict):
        found = [value["Get"]] if isinstance(value.get("Get"), str) else []
        return found + [ref for key, item in value.items() if key != "Get" for ref in gets(item)]
    if isinstance(value, list):
        return [ref for item in value for ref in gets(item)]
    return []


def step_reads(step: dict) -> set[str]:
    return {ref.split(".")[1] for ref in gets(step.get("Arguments", {})) if ref.startswith("Steps.")}


PATH_TOKEN = re.compile(r"\.?([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\['([^']*)'\]")


def walk_shape(shape, path: str) -> tuple[Any, list[str]]:
    """Follow a property path (``Outputs['data'].S3Output.S3Uri``) through a response shape.

    Returns the final shape and the list keys met on the way (``['data']``)."""
    keys, position = [], 0
    while position < len(path):
        match = PATH_TOKEN.match(path, position)
        assert match, f"cannot parse property path {path!r} at {path[position:]!r}"
        position = match.end()
        name, index, key = match.groups()
        if name is not None:
            assert shape.type_name == "structure" and name in shape.members, \
                f"{path!r}: {shape.name} has no member {name!r}"
            shape = shape.members[name]
        else:
            assert shape.type_name in ("list", "map"), f"{path!r}: {shape.name} is not a list"
            shape = shape.member if shape.type_name == "list" else shape.value
            if key is not None:
                keys.append(key)
    return shape, keys


def schema_definition(schema: dict, reference: dict) -> dict:
    return schema["definitions"][reference["$ref"].rsplit("/", 1)[-1]]


def code_uris(definition: dict) -> dict[str, dict[str, str]]:
    """step → {code input name → S3 URI} for every input that carries code rather than data."""
    found: dict[str, dict[str, str]] = {}
    for step in iter_steps(definition["Steps"]):
        arguments = step.get("Arguments", {})
        for item in arguments.get("ProcessingInputs", []):
            if item["InputName"] in CODE_INPUTS:
                found.setdefault(step["Name"], {})[item["InputName"]] = item["S3Input"]["S3Uri"]
        for channel in arguments.get("InputDataConfig", []):
            if channel["ChannelName"] in CODE_INPUTS:
                found.setdefault(step["Name"], {})[channel["ChannelName"]] = \
                    channel["DataSource"]["S3DataSource"]["S3Uri"]
    return found


# ----------------------------------------------------------------------------- API shapes
@pytest.mark.smoke
def test_job_arguments_are_valid_requests_of_their_api(steps, sagemaker_model):
    checked = [name for name, step in steps.items() if step["Type"] in OPERATIONS]
    assert sorted(checked) == sorted([name for name, kind in EXPECTED_STEPS if kind in OPERATIONS]
                                     + [NAMES.register])
    problems = {name: request_problems(steps[name], sagemaker_model) for name in checked}
    assert not any(problems.values()), "\n".join(f"{n}:\n{p}" for n, p in problems.items() if p)


def test_without_a_security_section_no_job_has_kms_or_network_settings(steps):
    """Security settings are opt-in and absent ones leave the jobs' arguments (and cache keys) as they were;
    with them, test_security.py runs the same shape check."""
    security_keys = {"KmsKeyId", "VolumeKmsKeyId", "NetworkConfig", "VpcConfig", "EnableNetworkIsolation",
                     "EnableInterContainerTrafficEncryption"}
    found = {name: sorted(security_keys & set(re.findall(r'"(\w+)":', json.dumps(step.get("Arguments", {})))))
             for name, step in steps.items()}
    assert found == {name: [] for name in steps}


def test_the_shape_check_catches_misspelled_and_mistyped_arguments(steps, sagemaker_model):
    """The check above would fail: a misspelled key, a wrong type, a missing required member."""
    misspelled = json.loads(json.dumps(steps[NAMES.evaluate]))
    misspelled["Arguments"]["AppSpecification"]["ContainerArgs"] = \
        misspelled["Arguments"]["AppSpecification"].pop("ContainerArguments")
    assert 'Unknown parameter in AppSpecification: "ContainerArgs"' in request_problems(misspelled, sagemaker_model)

    mistyped = json.loads(json.dumps(steps[NAMES.finetune]))
    mistyped["Arguments"]["ResourceConfig"]["VolumeSizeInGB"] = "30"
    assert "ResourceConfig.VolumeSizeInGB" in request_problems(mistyped, sagemaker_model)

    missing = json.loads(json.dumps(steps[NAMES.prepare]))
    del missing["Arguments"]["AppSpecification"]["ImageUri"]
    assert 'Missing required parameter in AppSpecification: "ImageUri"' in request_problems(missing, sagemaker_model)

    register = json.loads(json.dumps(steps[NAMES.register]))
    register["Arguments"]["ModelAprovalStatus"] = register["Arguments"].pop("ModelApprovalStatus")
    assert 'Unknown parameter in input: "ModelAprovalStatus"' in request_problems(register, sagemaker_model)

    # an expression where the API wants a structure is not papered over by a placeholder
    structured = json.loads(json.dumps(steps[NAMES.prepare]))
    structured["Arguments"]["ProcessingResources"] = {"Get": "Parameters.ProcessingInstanceType"}
    assert "ProcessingResources" in request_problems(structured, sagemaker_model)


def mistyped_parameter_uses(definition: dict, steps: dict, sagemaker_model) -> list[str]:
    """``Get: Parameters.X`` placed directly in a member whose type is not X's type.

    The SDK's ``to_string()`` (``Std:Join`` of one value) exists because the service does not turn
    an Integer or Float parameter into a string by itself: a string member takes a String
    parameter, or a Std:Join around any parameter.
    """
    types = {p["Name"]: p["Type"] for p in definition["Parameters"]}
    wanted = {"string": "String", "integer": "Integer", "long": "Integer", "float": "Float", "double": "Float",
              "boolean": "Boolean"}
    found = []

    def visit(value, shape, where):
        if is_expression(value):
            reference = value.get("Get", "")
            if reference.startswith("Parameters."):
                kind = types.get(reference.split(".", 1)[1])
                if wanted.get(shape.type_name) != kind:
                    found.append(f"{where}: {kind} parameter {reference} in a {shape.type_name} member")
        elif shape.type_name == "structure" and isinstance(value, dict):
            for key, item in value.items():
                if key in shape.members:
                    visit(item, shape.members[key], f"{where}.{key}")
        elif shape.type_name == "list" and isinstance(value, list):
            for i, item in enumerate(value):
                visit(item, shape.member, f"{where}[{i}]")
        elif shape.type_name == "map" and isinstance(value, dict):
            for key, item in value.items():
                visit(item, shape.value, f"{where}[{key!r}]")

    for name, step in steps.items():
        if step["Type"] in OPERATIONS:
            visit(step["Arguments"], sagemaker_model.operation_model(OPERATIONS[step["Type"]]).input_shape, name)
    return found


def test_numeric_parameters_reach_string_members_as_strings(definition, steps, sagemaker_model):
    assert mistyped_parameter_uses(definition, steps, sagemaker_model) == []


def test_the_parameter_type_check_sees_wrapped_and_unwrapped_uses(definition, steps, sagemaker_model):
    """The check above flags a bare Integer parameter in a string member and accepts it inside Std:Join."""
    broken = json.loads(json.dumps(steps[NAMES.prepare]))
    broken["Arguments"]["AppSpecification"]["ContainerArguments"] += ["--rank", {"Get": "Parameters.LoraRank"}]
    wrapped = json.loads(json.dumps(steps[NAMES.prepare]))
    wrapped["Arguments"]["AppSpecification"]["ContainerArguments"] += [
        "--rank", {"Std:Join": {"On": "", "Values": [{"Get": "Parameters.LoraRank"}]}}]
    assert any("LoraRank" in p for p in mistyped_parameter_uses(definition, {"X": broken}, sagemaker_model))
    assert mistyped_parameter_uses(definition, {"X": wrapped}, sagemaker_model) == []


# ----------------------------------------------------------------------------- references
@pytest.mark.smoke
def test_every_reference_names_something_that_exists(definition, steps, sagemaker_model):
    parameters = {p["Name"] for p in definition["Parameters"]}
    property_files = {name: {f["PropertyFileName"]: f for f in step.get("PropertyFiles", [])}
                      for name, step in steps.items()}
    references = [(name, ref) for name, step in steps.items() for ref in gets(step.get("Arguments", {}))]
    references += [("PipelineExperimentConfig", ref) for ref in gets(definition.get("PipelineExperimentConfig", {}))]
    assert len(references) > 30
    for where, ref in references:
        scope, _, rest = ref.partition(".")
        if scope == "Parameters":
            assert rest in parameters, f"{where}: {ref} names no parameter of the definition"
        elif scope == "Execution":
            assert rest in EXECUTION_VARIABLES, f"{where}: {ref} is not an execution variable"
        else:
            assert scope == "Steps", f"{where}: {ref}: unknown scope"
            target, _, path = rest.partition(".")
            assert target in steps, f"{where}: {ref} names no step (steps: {sorted(steps)})"
            assert target != where, f"{where} reads its own properties"
            if path.startswith("PropertyFiles."):
                file_name = path.split(".", 1)[1]
                assert file_name in property_files[target], f"{where}: {ref}: {target} has no such PropertyFile"
                continue
            kind = steps[target]["Type"]
            output_shape = sagemaker_model.operation_model(DESCRIBE[kind]).output_shape
            _, keys = walk_shape(output_shape, path)   # the path exists in the job's Describe* response
            if path.startswith("ProcessingOutputConfig.Outputs"):
                outputs = [o["OutputName"] for o in steps[target]["Arguments"]["ProcessingOutputConfig"]["Outputs"]]
                assert keys and keys[0] in outputs, f"{where}: {ref}: {target} has outputs {outputs}"

    # every JsonGet reads a PropertyFile whose output exists on its step
    for name, spec in property_files[NAMES.evaluate].items():
        outputs = [o["OutputName"] for o in steps[NAMES.evaluate]["Arguments"]["ProcessingOutputConfig"]["Outputs"]]
        assert spec["OutputName"] in outputs


def test_the_reference_check_would_catch_a_dangling_reference(steps, sagemaker_model):
    output_shape = sagemaker_model.operation_model("DescribeProcessingJob").output_shape
    with pytest.raises(AssertionError, match="no member 'ProcessingOutputs'"):
        walk_shape(output_shape, "ProcessingOutputs['data'].S3Output.S3Uri")
    _, keys = walk_shape(output_shape, "ProcessingOutputConfig.Outputs['data'].S3Output.S3Uri")
    assert keys == ["data"]


# ----------------------------------------------------------------------------- published schema
@pytest.fixture(scope="module")
def schema() -> dict:
    if not SCHEMA.is_file():
        pytest.skip(f"{SCHEMA} is not present (only beside the project's own clone)")
    return json.loads(SCHEMA.read_text(encoding="utf-8"))


# Fields the SDK writes that the (older) published schema does not know yet.
NEWER_TOP_LEVEL = {"PipelineExperimentConfig", "MlflowConfig"}
NEWER_STEP_FIELDS = {"PropertyFiles"}


@pytest.mark.smoke
def test_structure_matches_the_published_schema(definition, steps, schema):
    top = schema["properties"]
    assert set(schema["required"]) <= set(definition)
    assert set(definition) <= set(top) | NEWER_TOP_LEVEL, set(definition) - set(top) - NEWER_TOP_LEVEL
    assert definition["Version"] in top["Version"]["enum"]
    for key, value in definition.get("Metadata", {}).items():
        assert re.fullmatch(next(iter(top["Metadata"]["patternProperties"])), key) and isinstance(value, str)

    json_types = {"string": str, "integer": int, "number": (int, float), "boolean": bool}
    parameter_defs = {schema_definition(schema, ref)["properties"]["Type"]["enum"][0]: schema_definition(schema, ref)
                      for ref in top["Parameters"]["items"]["oneOf"]}
    name_pattern = schema["definitions"]["ParameterName"]["pattern"]
    for parameter in definition["Parameters"]:
        assert parameter["Type"] in parameter_defs, parameter
        spec = parameter_defs[parameter["Type"]]
        assert set(spec.get("required", [])) <= set(parameter) and set(parameter) <= set(spec["properties"]), parameter
        assert re.fullmatch(name_pattern, parameter["Name"])
        default = parameter["DefaultValue"]
        assert isinstance(default, json_types[spec["properties"]["DefaultValue"]["type"]]), parameter
        assert parameter["Type"] == "Boolean" or not isinstance(default, bool), parameter

    step_defs = {schema_definition(schema, ref)["properties"]["Type"]["enum"][0]: schema_definition(schema, ref)
                 for ref in top["Steps"]["items"]["oneOf"]}
    step_name = schema["definitions"]["StepName"]["pattern"]
    for step in steps.values():
        assert step["Type"] in step_defs, f"{step['Name']}: type {step['Type']} is not a pipeline step type"
        spec = step_defs[step["Type"]]
        assert set(spec["required"]) <= set(step), step["Name"]
        unknown = set(step) - set(spec["properties"]) - NEWER_STEP_FIELDS
        assert not unknown, f"{step['Name']}: fields the schema does not know: {unknown}"
        assert re.fullmatch(step_name, step["Name"])
        for dependency in step.get("DependsOn", []):
            assert dependency in steps
        if "CacheConfig" in step:
            assert set(step["CacheConfig"]) <= set(schema["definitions"]["CacheConfig"]["properties"])
            assert step["CacheConfig"]["Enabled"] is True
            assert re.fullmatch(r"P(\d+[YMWD])*(T(\d+[HMS])+)?", step["CacheConfig"]["ExpireAfter"])
        retry = schema["definitions"]["RetryPolicy"]["properties"]
        for policy in step.get("RetryPolicies", []):
            assert set(policy) <= set(retry)
            kinds = policy["ExceptionType"] if isinstance(policy["ExceptionType"], list) else [policy["ExceptionType"]]
            assert set(kinds) <= set(retry["ExceptionType"]["enum"])
    assert len(steps) == len([s for s in iter_steps(definition["Steps"])]), "step names must be unique"

    gate = steps[NAMES.gate]["Arguments"]
    condition_spec = step_defs["Condition"]["properties"]["Arguments"]["properties"]
    condition_types = {t for ref in condition_spec["Conditions"]["items"]["oneOf"]
                       for t in schema_definition(schema, ref)["properties"]["Type"]["enum"]}
    assert {c["Type"] for c in gate["Conditions"]} <= condition_types
    branch_types = {schema_definition(schema, ref)["properties"]["Type"]["enum"][0]
                    for ref in condition_spec["IfSteps"]["items"]["oneOf"]}
    assert {s["Type"] for s in gate["IfSteps"] + gate["ElseSteps"]} <= branch_types


# ----------------------------------------------------------------------------- parameters and graph
@pytest.mark.smoke
def test_parameters_match_the_shipped_quick_config(definition):
    quick = yaml.safe_load((config_dir() / "quick.yaml").read_text(encoding="utf-8"))["parameters"]
    kinds = {int: "Integer", float: "Float", str: "String"}
    declared = {name: kinds.get(field.annotation, "String") for name, field in Parameters.model_fields.items()}
    in_definition = {p["Name"]: p for p in definition["Parameters"]}
    assert set(in_definition) == set(quick) == set(declared)
    for name, value in quick.items():
        parameter = in_definition[name]
        assert parameter["Type"] == declared[name], name
        assert parameter["DefaultValue"] == value, name
        assert type(parameter["DefaultValue"]) is {"Integer": int, "Float": float, "String": str}[parameter["Type"]]
    assert in_definition["OptimizationMethod"] == {"Name": "OptimizationMethod", "Type": "String",
                                                   "DefaultValue": "quantize"}
    assert {"LoraRank", "LoraAlpha", "MinRougeL", "MaxP95LatencyMs", "MaxRougeLDrop", "ModelPackageGroupName",
            "ModelApprovalStatus", "InputDataUri", "BaseModelId"} <= set(in_definition)


@pytest.mark.smoke
def test_step_graph(definition, steps):
    assert [(s["Name"], s["Type"]) for s in definition["Steps"]] == EXPECTED_STEPS
    gate = steps[NAMES.gate]["Arguments"]
    assert [(s["Name"], s["Type"]) for s in gate["IfSteps"]] == [("RegisterModel", "RegisterModel")]
    assert [(s["Name"], s["Type"]) for s in gate["ElseSteps"]] == [("GateFailed", "Fail")]

    assert step_reads(steps[NAMES.prepare]) == set()
    assert step_reads(steps[NAMES.select]) == set()     # the stand-in ships pretrained: no data needed
    finetune = steps[NAMES.finetune]["Arguments"]
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in finetune["InputDataConfig"]}
    assert channels["data"] == {"Get": "Steps.PrepareData.ProcessingOutputConfig.Outputs['data'].S3Output.S3Uri"}
    assert channels["model"] == {"Get": "Steps.SelectModel.ProcessingOutputConfig.Outputs['model'].S3Output.S3Uri"}
    as_text = lambda name: {"Std:Join": {"On": "", "Values": [{"Get": f"Parameters.{name}"}]}}  # noqa: E731
    assert finetune["HyperParameters"]["lora-r"] == as_text("LoraRank")
    assert finetune["HyperParameters"]["lora-alpha"] == as_text("LoraAlpha")

    variants = ("Distill", "Quantize", "Prune")
    for variant in variants:
        assert step_reads(steps[f"Optimize{variant}"]) == {NAMES.finetune, NAMES.prepare}
        assert "Parameters.OptimizationMethod" in gets(steps[f"Optimize{variant}"]["Arguments"])
    evaluate = steps[NAMES.evaluate]
    inputs = {i["InputName"]: i["S3Input"]["S3Uri"] for i in evaluate["Arguments"]["ProcessingInputs"]}
    for variant in variants:
        assert inputs[variant.lower()] == {
            "Get": f"Steps.Optimize{variant}.ProcessingOutputConfig.Outputs['model'].S3Output.S3Uri"}
    assert inputs["finetuned"] == {"Get": "Steps.FineTuneLoRA.ModelArtifacts.S3ModelArtifacts"}
    assert step_reads(evaluate) == {NAMES.prepare, NAMES.select, NAMES.finetune,
                                    *(f"Optimize{v}" for v in variants)}
    assert evaluate["PropertyFiles"] == [{"PropertyFileName": EVALUATION_REPORT, "OutputName": "evaluation",
                                          "FilePath": "evaluation.json"}]

    # the gate compares evaluate.py's figures with the thresholds; a fact condition holds where no facts are
    # recorded (Or); RegisterModel and GateFailed read Evaluate
    comparisons = [c["Conditions"][1] if c["Type"] == "Or" else c for c in gate["Conditions"]]
    json_gets = [c["LeftValue"]["Std:JsonGet"] for c in comparisons]
    assert {g["PropertyFile"]["Get"] for g in json_gets} == {"Steps.Evaluate.PropertyFiles.EvaluationReport"}
    assert [g["Path"] for g in json_gets] == [GATE_PATHS[name] for name in
                                              ("rougeL", "latency_p95_ms", "latency_ratio", "rougeL_drop",
                                               "facts_all_right", "facts_all_right_drop", "repetition_rate")]
    assert [c["RightValue"] for c in comparisons] == [
        {"Get": "Parameters.MinRougeL"}, {"Get": "Parameters.MaxP95LatencyMs"}, {"Get": "Parameters.MaxLatencyRatio"},
        {"Get": "Parameters.MaxRougeLDrop"}, {"Get": "Parameters.MinFactAccuracy"},
        {"Get": "Parameters.MaxFactAccuracyDrop"}, {"Get": "Parameters.MaxRepetitionRate"}]
    assert [c["Type"] for c in comparisons] == ["GreaterThanOrEqualTo"] + ["LessThanOrEqualTo"] * 3 + \
        ["GreaterThanOrEqualTo", "LessThanOrEqualTo", "LessThanOrEqualTo"]
    assert [c["Type"] for c in gate["Conditions"]] == ["GreaterThanOrEqualTo"] + ["LessThanOrEqualTo"] * 3 + \
        ["Or", "Or", "LessThanOrEqualTo"]
    for condition in gate["Conditions"][4:6]:
        skip = condition["Conditions"][0]
        assert skip["Type"] == "Equals" and skip["RightValue"] == 0
        assert skip["LeftValue"]["Std:JsonGet"]["Path"] == GATE_PATHS["facts_recorded"] == "metrics.facts_recorded.value"
    evaluate_arguments = steps[NAMES.evaluate]["Arguments"]["AppSpecification"]["ContainerArguments"]
    for flag, parameter in (("--select-within-drop", "MaxRougeLDrop"), ("--select-max-fact-drop", "MaxFactAccuracyDrop"),
                            ("--select-max-repetition", "MaxRepetitionRate")):
        assert gets(evaluate_arguments[evaluate_arguments.index(flag) + 1]) == [f"Parameters.{parameter}"], flag
    # the FailStep's message names every condition with its measured value and its threshold
    message = steps[NAMES.fail]["Arguments"]["ErrorMessage"]["Std:Join"]["Values"]
    for condition in GATE:
        assert condition.label in message and {"Get": f"Parameters.{condition.parameter}"} in message
    assert step_reads(steps[NAMES.register]) == {NAMES.evaluate}
    assert step_reads(steps[NAMES.fail]) == {NAMES.evaluate}
    metrics = steps[NAMES.register]["Arguments"]["ModelMetrics"]["ModelQuality"]["Statistics"]
    assert gets(metrics["S3Uri"]) == ["Steps.Evaluate.ProcessingOutputConfig.Outputs['evaluation'].S3Output.S3Uri"]


# ----------------------------------------------------------------------------- gate paths vs evaluate.py
def fake_evaluation(tmp_path: Path, monkeypatch, rows: list[dict], fake: dict, model: str = "finetuned",
                    extra: tuple[str, ...] = ()) -> dict:
    """evaluate.py's main() on fake model results (no model is loaded); returns the evaluation.json it wrote.

    ``fake``: folder name → (prediction for a row, p95 latency ms); distill is always a skipped branch and
    every other name but ``model`` and baseline is compared.
    """
    evaluate = import_step("evaluate")
    data = tmp_path / "data"
    data.mkdir(parents=True)
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    folders = {name: tmp_path / name for name in {*fake, "distill"}}
    for folder in folders.values():
        folder.mkdir()
        (folder / "weights.bin").write_bytes(b"\0" * 64)
    (folders["distill"] / "SKIPPED.json").write_text(json.dumps(
        {"variant": "distill", "method": "quantize", "reason": "OptimizationMethod is quantize"}), encoding="utf-8")

    def load_and_score(name, folder, flag, rows, generation):
        predict, _ = fake[Path(folder).name]
        predictions = [predict(r) for r in rows]
        return {"model_dir": str(folder), "loaded_from": Path(folder), "card": {"name": Path(folder).name},
                "predictions": predictions, **evaluate.score(predictions, rows)}

    def measure_costs(results, rows, cost_settings):
        for result in results.values():
            p95 = fake[Path(result["model_dir"]).name][1]
            result["cost"] = {"parameters": 1000, "weights_bytes": 64, "latency_p50_ms": p95 / 2, "latency_p95_ms": p95,
                              "latency_ratio": p95 / fake["baseline"][1], "throughput_tokens_per_s": 10.0,
                              "flops_per_generated_token": 2000}

    monkeypatch.setattr(evaluate, "load_and_score", load_and_score)
    monkeypatch.setattr(evaluate, "measure_costs", measure_costs)
    output = tmp_path / "evaluation"
    compared = [name for name in folders if name not in (model, "baseline")]
    code = evaluate.main(["--model-dir", str(folders[model]), "--baseline-dir", str(folders["baseline"]),
                          "--data-dir", str(data), "--output-dir", str(output), "--constant-candidates", "2",
                          *[arg for name in sorted(compared) for arg in ("--compare", f"{name}={folders[name]}")],
                          *extra])
    assert code == 0
    return json.loads((output / "evaluation.json").read_text(encoding="utf-8"))


def test_gate_paths_exist_in_the_evaluation_json_that_evaluate_writes(tmp_path, monkeypatch):
    rows = [{"id": f"d{i}", "dialogue": f"#Person1#: I need {i} apples. #Person2#: Fine.",
             "summary": f"Person1 needs {i} apples.", "references": [f"Person1 needs {i} apples."]} for i in range(4)]
    # name → (prediction for every row, p95 latency ms): quantize loses a little ROUGE-L and is fastest,
    # prune is faster still but loses too much to be eligible.
    fake = {"finetuned": (lambda r: r["summary"], 100.0), "baseline": (lambda r: "hello", 120.0),
            "quantize": (lambda r: r["summary"].replace("Person1 ", ""), 50.0),
            "prune": (lambda r: "apples", 20.0)}
    report = fake_evaluation(tmp_path, monkeypatch, rows, fake, extra=(
        "--package-dir", str(tmp_path / "package"), "--select-within-drop", "0.2"))
    values = {name: json_path(report, path, "evaluation.json") for name, path in GATE_PATHS.items()}
    assert values["variant"] == "quantize"
    assert values["latency_p95_ms"] == 50.0 and values["latency_ratio"] == pytest.approx(50 / 120)
    finetuned_rouge = report["model"]["metrics"]["rougeL"]["value"]
    assert 0 < values["rougeL"] < finetuned_rouge
    assert values["rougeL_drop"] == pytest.approx(finetuned_rouge - values["rougeL"], abs=1e-6)
    numeric = [condition.metric for condition in GATE] + ["facts_recorded"]
    assert all(isinstance(values[n], (int, float)) for n in numeric), values
    assert values["facts_recorded"] == 0 and values["facts_recorded_note"].startswith("skipped: the data records no facts")
    assert [s["name"] for s in report["skipped"]] == ["distill"]
    assert (tmp_path / "package" / "model.tar.gz").is_file() and report["package"]["variant"] == "quantize"
    # what RegisterModel attaches as ModelQuality statistics sits beside it
    assert (tmp_path / "evaluation" / "model_quality.json").is_file()


def gate_outcome(steps: dict, report: dict) -> tuple[bool, dict, str]:
    """The QualityGate of the built definition, run by the local executor's own condition code on ``report``
    with the quick config's thresholds: (outcome, gate_facts as the summary and report show it, FailStep message)."""
    from flanops.pipelines.runfacts import gate_facts
    from flanops.pipelines.expressions import Context, evaluate_condition

    parameters = load_config().parameter_values()
    context = Context("e1", "arn:e1", "p", parameters, property_files={f"{NAMES.evaluate}.{EVALUATION_REPORT}": report})
    outcome = all(evaluate_condition(c, context, NAMES.gate) for c in steps[NAMES.gate]["Arguments"]["Conditions"])
    message = context.resolve(steps[NAMES.fail]["Arguments"]["ErrorMessage"], NAMES.fail)
    record = {"PropertyFiles": context.property_files, "Parameters": parameters,
              "Steps": [{"StepName": NAMES.gate, "Metadata": {"Condition": {"Outcome": str(outcome)}}}]}
    return outcome, gate_facts(record), message


def meeting_rows(count: int = 6) -> list[dict]:
    """Synthetic-style rows with their facts recorded."""
    days, names = ("Monday", "Tuesday", "Friday"), (("Ann", "Bob"), ("Priya", "Xena"), ("Hugo", "Ines"))
    rows = []
    for i in range(count):
        (first, second), day, time = names[i % 3], days[i % 3], f"{i + 1} pm"
        summary = f"{first} and {second} will meet on {day} at {time} to discuss the budget."
        rows.append({"id": f"m{i}", "dialogue": f"#Person1#: {second}, it's {first}. Can we meet on {day} at {time}?\n"
                                                f"#Person2#: Yes, to discuss the budget.",
                     "summary": summary, "references": [summary],
                     "facts": {"speakers": [first, second], "day": day, "time": time}})
    return rows


def babble(row: dict) -> str:
    """What the issue saw a pruned variant answer: right facts, then a loop."""
    return row["summary"].replace("discuss the budget.", "discusssssssssss")


def test_a_variant_that_repeats_itself_is_not_chosen_and_fails_the_gate(steps, tmp_path, monkeypatch):
    fake = {"finetuned": (lambda r: r["summary"], 100.0), "baseline": (lambda r: "hello", 120.0),
            "prune": (babble, 20.0)}   # the fastest, its ROUGE-L within the drop and every fact right: but it babbles
    selected = fake_evaluation(tmp_path / "auto", monkeypatch, meeting_rows(), fake, extra=(
        "--select-within-drop", "0.2", "--select-max-fact-drop", "0.05", "--select-max-repetition", "0.02"))
    prune = next(row for row in selected["selection"]["candidates"] if row["name"] == "prune")
    assert selected["selected_variant"] == "finetuned"
    assert prune["rougeL_drop"] <= 0.2 and prune["facts_all_right"] == 1.0 and prune["repetition_rate"] == 1.0
    assert prune["why"] == "not eligible: repeats itself in 1.0000 of its summaries, more than the 0.02 allowed"
    assert selected["comparisons"]["prune"]["metrics"]["repetition_rate"]["value"] == 1.0
    outcome, gate, _ = gate_outcome(steps, selected)
    assert outcome is True and gate["passed"] is True

    # The same babbling model as the one the gate judges (it is the only candidate): the gate fails it on
    # repetition alone, and the summary, the hint and the FailStep's message say so.
    judged = fake_evaluation(tmp_path / "alone", monkeypatch, meeting_rows(), {**fake, "finetuned": (babble, 20.0)},
                             extra=("--select-within-drop", "0.2", "--select-max-repetition", "0.02"))
    assert judged["metrics"]["repetition_rate"]["value"] == 1.0 and judged["metrics"]["facts_all_right"]["value"] == 1.0
    outcome, gate, message = gate_outcome(steps, judged)
    assert outcome is False and gate["passed"] is False
    assert [c["parameter"] for c in gate["conditions"] if c["passed"] is False] == ["MaxRepetitionRate"]
    from flanops.pipelines.summary import gate_sentence

    bound = {c["parameter"]: c["threshold"] for c in gate["conditions"]}
    assert f"repeating summaries 1 (max {bound['MaxRepetitionRate']:g}) FAILED" in gate_sentence(gate)
    assert f"repeating summaries 1.0 (max {float(bound['MaxRepetitionRate'])} )" in message
    assert f"all facts right 1.0 (min {float(bound['MinFactAccuracy'])} — checked: the data records facts )" in message


def test_the_fact_conditions_are_skipped_where_the_data_records_no_facts(steps, tmp_path, monkeypatch):
    """DialogSum records no facts: the fact figures are placeholders that would fail, and the Or skips them."""
    from flanops.pipelines.expressions import Context, evaluate_condition

    rows = [{key: value for key, value in row.items() if key != "facts"} for row in meeting_rows()]
    fake = {"finetuned": (lambda r: r["summary"], 100.0), "baseline": (lambda r: "hello", 120.0),
            "quantize": (lambda r: r["summary"], 50.0)}
    report = fake_evaluation(tmp_path, monkeypatch, rows, fake, extra=("--select-within-drop", "0.05"))
    assert report["metrics"]["facts_recorded"]["value"] == 0
    outcome, gate, message = gate_outcome(steps, report)
    assert outcome is True
    note = "skipped: the data records no facts (e.g. DialogSum)"
    skipped = {c["parameter"]: c for c in gate["conditions"] if c["skipped"]}
    assert set(skipped) == {"MinFactAccuracy", "MaxFactAccuracyDrop"}
    assert all(c["skipped"] == note and c["passed"] for c in skipped.values())
    assert f"all facts right 0.0 (min {float(skipped['MinFactAccuracy']['threshold'])} — {note} )" in message
    context = Context("e1", "arn:e1", "p", load_config().parameter_values(),
                      property_files={f"{NAMES.evaluate}.{EVALUATION_REPORT}": report})
    fact_condition = next(c for c in steps[NAMES.gate]["Arguments"]["Conditions"] if c["Type"] == "Or")
    assert not evaluate_condition(fact_condition["Conditions"][1], context, NAMES.gate), \
        "the placeholder alone would fail MinFactAccuracy: the skip is what lets the gate pass"


def test_a_row_added_to_the_gate_table_reaches_every_place_that_shows_the_gate(aws, tmp_path, monkeypatch, capsys):
    """One edit adds a condition: the ConditionStep, the FailStep's message, the printed summary (and its hint) and
    both report templates (conditions and candidates) are all made from config.GATE."""
    import sys
    import warnings

    from flanops.pipelines.summary import summarize_execution
    from flanops.pipelines.runfacts import gate_facts
    from flanops.pipelines.tables import GateCondition
    from flanops.pipelines.expressions import Context, evaluate_condition
    from flanops.pipelines.stepgraph import StepGraph
    from flanops.pipelines.report import page_context, templates
    from flanops.pipelines.runfacts import RunFacts

    original = GATE
    added = GateCondition("rouge1", "MinRougeL", True, "ROUGE-1 (test row)")
    gate = (*original, added)
    for module in [m for m in sys.modules.values() if getattr(m, "GATE", None) is original]:   # wherever bound
        monkeypatch.setattr(module, "GATE", gate)
    config = load_config()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        built = json.loads(definition_module.get_pipeline(config, ROLE_ARN, BUCKET, aws.session).definition())
    built_steps = {step["Name"]: step for step in iter_steps(built["Steps"])}
    conditions = built_steps[NAMES.gate]["Arguments"]["Conditions"]
    assert len(conditions) == len(original) + 1
    new = conditions[-1]
    assert new["Type"] == "GreaterThanOrEqualTo" and new["LeftValue"]["Std:JsonGet"]["Path"] == "metrics.rouge1.value"
    assert new["RightValue"] == {"Get": "Parameters.MinRougeL"}

    # every other condition passes, the new one does not
    report = {"metrics": {c.metric: {"value": 1.0 if c.at_least else 0.0} for c in gate},
              "selected_variant": "finetuned",
              "selection": {"rule": "lowest p95", "candidates": [
                  {"name": "finetuned", "rougeL": 1.0, "rouge1": 0.123, "latency_p95_ms": 5.0, "why": "won"}]}}
    report["metrics"].update({"rouge1": {"value": 0.123},
                              "facts_recorded": {"value": 1, "note": "checked: the data records facts"}})
    parameters = config.parameter_values()
    context = Context("e1", "arn:e1", "p", parameters, property_files={f"{NAMES.evaluate}.{EVALUATION_REPORT}": report})
    assert [evaluate_condition(c, context, NAMES.gate) for c in conditions] == [True] * len(original) + [False]
    message = context.resolve(built_steps[NAMES.fail]["Arguments"]["ErrorMessage"], NAMES.fail)
    assert f"ROUGE-1 (test row) 0.123 (min {parameters['MinRougeL']} )" in message

    record = {"PipelineExecutionArn": "arn:e1", "ExecutionId": "e1", "PipelineExecutionStatus": "Failed",
              "FailureReason": message, "Parameters": parameters, "PropertyFiles": context.property_files,
              "Steps": [{"StepName": NAMES.gate, "StepType": "Condition", "StepStatus": "Succeeded",
                         "Metadata": {"Condition": {"Outcome": "False"}}},
                        {"StepName": NAMES.fail, "StepType": "Fail", "StepStatus": "Failed", "Metadata": {}}]}
    assert summarize_execution(record, tmp_path) == 1
    printed = capsys.readouterr().out
    assert f"ROUGE-1 (test row) 0.123 (min {parameters['MinRougeL']}) FAILED" in printed
    assert "--param MinRougeL=… (ROUGE-1 (test row) 0.123 against min" in printed
    assert "finetuned  ROUGE-L 1, p95 latency 5 ms, ROUGE-1 (test row) 0.123  won" in printed

    execution = {"id": "e1", "arn": "arn:e1", "pipeline": "p", "status": "Failed", "failure_reason": message,
                 "parameters": parameters, "run_dir": str(tmp_path), "created": "", "ended": ""}
    facts = RunFacts(execution=execution, steps=[], graph=StepGraph.of(built), gate=gate_facts(record))
    context = page_context(facts, {"pipeline": "pipeline.png"})
    markdown = templates().get_template("report.md.j2").render(**context)
    assert f"| ROUGE-1 (test row) | 0.123 | min {parameters['MinRougeL']} | MinRougeL | FAILED |" in markdown
    assert "| candidate | ROUGE-L | p95 latency | ROUGE-1 (test row) | why |" in markdown
    assert "| finetuned | 1.0 | 5.0 | 0.123 | won |" in markdown
    html = templates().get_template("report.html.j2").render(**context)
    assert "<tr><td>ROUGE-1 (test row)</td>" in html and "<th>ROUGE-1 (test row)</th>" in html


# ----------------------------------------------------------------------------- stability
def test_building_twice_gives_the_same_bytes(aws, text):
    shutil.rmtree(remembered.definitions_dir())   # the SDK builds it again, not the remembered copy
    assert aws.build() == text


def test_an_unchanged_definition_is_remembered_and_its_code_put_back_where_missing(aws, text):
    """A rerun reads the definition back instead of building it (seconds with the SDK), and the code objects it
    points to are restored to S3 when they are gone (embedded AWS restarted)."""
    s3 = aws.session.client("s3")
    code = [item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET, Prefix="flanops-quick/code/")["Contents"]]
    assert any(key.endswith(".whl") for key in code) and any(key.endswith("sourcedir.tar.gz") for key in code)
    for key in code:
        s3.delete_object(Bucket=BUCKET, Key=key)
    calls = []
    original = definition_module.get_pipeline
    try:
        definition_module.get_pipeline = lambda *args, **kwargs: calls.append(args) or original(*args, **kwargs)
        assert aws.build() == text
    finally:
        definition_module.get_pipeline = original
    assert calls == [], "an unchanged definition is not built again"
    restored = {item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET, Prefix="flanops-quick/code/")["Contents"]}
    referenced = {key for key in code if any(key.startswith(uri.removeprefix(f"s3://{BUCKET}/"))
                                             for uri in re.findall(rf"s3://{BUCKET}/flanops-quick/code/[^\"]+", text))}
    assert restored == referenced and any(key.endswith(".whl") for key in restored)


def test_an_edit_of_the_step_or_gate_table_is_not_answered_from_the_remembered_definition(monkeypatch):
    from flanops.pipelines.remembered import definition_key

    config = load_config()
    key = definition_key(config, ROLE_ARN, BUCKET, REGION)
    read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda path: read_bytes(path) + (b"# a new row" if path.name == "tables.py"
                                                                             else b""))
    assert definition_key(config, ROLE_ARN, BUCKET, REGION) != key


def test_a_changed_step_script_changes_the_code_locations(aws, text, definition, tmp_path, monkeypatch):
    config = load_config()   # before the patch: load_config imports the step scripts to check settings
    copy = tmp_path / "steps"
    shutil.copytree(code_locations.steps_dir(), copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    with (copy / "evaluate.py").open("a", encoding="utf-8") as handle:
        handle.write("# one more line\n")
    monkeypatch.setattr(code_locations, "steps_dir", lambda: copy)
    changed_text = aws.build(config)
    before, after = code_uris(definition), code_uris(json.loads(changed_text))
    assert before.keys() == after.keys() and before[NAMES.evaluate].keys() >= {"code"}
    assert before[NAMES.evaluate]["code"] != after[NAMES.evaluate]["code"]
    # the SDK's runproc.sh and install_requirements.py stay where they were (sm_drivers may move: its
    # sourcecode.json names our bundle's location)
    for step, uris in before.items():
        for name in set(uris) & {"aux", "entrypoint"}:
            assert after[step][name] == uris[name], (step, name)
    # and nothing but code locations changed in the definition
    restored = changed_text
    for step, uris in after.items():
        for name, uri in uris.items():
            restored = restored.replace(uri, before[step][name])
    assert restored == text


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def empty_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("FLANOPS_HOME", str(home))
    return home


@pytest.mark.smoke
@pytest.mark.parametrize("arguments, expected", [
    (["--param", "Foo=1"], ["--param Foo", "unknown parameter", "LoraRank"]),
    (["--param", "loRA_rank=8"], ["unknown parameter", "did you mean LoraRank"]),
    (["--param", "LoraRnak=8"], ["unknown parameter", "did you mean LoraRank?"]),
    # a shipped config is named as such, not by where the package is installed
    (["--param", "LoraRank=abc"], ["error: configs/quick.yaml with --param LoraRank=abc: parameters.LoraRank",
                                   "integer", "'abc'"]),
    (["--config", "nope.yaml"], ["--config nope.yaml", "no such file", "quick"]),
    (["--param", "MinRougeL=40"], ["MinRougeL", "less than or equal to 1", "40"]),
    (["--param", "steps.finetune.max_stepz=5"], ["steps.finetune", "finetune_lora.py", "max-stepz"]),
    # argparse would take a prefix of a flag for the flag (--max-step for --max-steps) and the default would win
    (["--param", "steps.finetune.max_step=50"], ["--param steps.finetune.max_step: finetune_lora.py has no flag "
                                                 "--max-step; did you mean max_steps?"]),
    (["--param", "steps.finetune.learning_rat=0.1"], ["finetune_lora.py has no flag --learning-rat; did you mean "
                                                      "learning_rate?"]),
    (["--param", "steps.finetun.max_steps=5"], ["unknown step 'finetun' (did you mean finetune?)"]),
    (["--param", "steps.finetune.max_steps=abc"], ["configs/quick.yaml with --param steps.finetune.max_steps=abc: "
                                                   "steps.finetune (finetune_lora.py)", "invalid int value: 'abc'"]),
    (["--param", "steps.finetune.help=true"], ["steps.finetune.help: settings are flag names"]),
    (["--param", "steps.finetune.lora_r=4"], ["steps.finetune.lora_r", "set by the pipeline itself",
                                              "from parameter LoraRank; set it with --param LoraRank="]),
    # flags the pipeline does not set, refused for what they would do
    (["--param", "steps.select.dry_run=true"], ["steps.select.dry_run: not a setting of the pipeline's SelectModel "
                                                "job: with it the job writes no model"]),
    (["--param", "steps.prepare.overwrite=true"], ["each job's output folder starts empty"]),
    (["--param", "steps.distill.checkpoint_dir=/tmp/x"], ["OptimizeDistill", "no checkpoint location"]),
    (["--param", "steps.evaluate.no_runtime_wheel=true"], ["steps.evaluate.no_runtime_wheel: set by the pipeline"]),
])
def test_bad_input_is_refused_before_anything_runs(arguments, expected, empty_home, tmp_path, capsys):
    out_dir = tmp_path / "run"
    code = cli.main(["run", "--output-dir", str(out_dir), *arguments])
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.err.startswith("error: ")
    for text in expected:
        assert text in captured.err, captured.err
    assert "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1, captured.err
    assert str(config_dir()) not in captured.err, "a shipped config is named configs/<name>.yaml"
    assert not empty_home.exists(), "no embedded AWS may start for a config error"
    assert not out_dir.exists()


@pytest.mark.smoke
def test_a_step_setting_in_a_config_file_must_be_exactly_a_flag(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("pipeline_name: typo\nsteps:\n  distill:\n    max_steps: 5\n    temprature: 2\n")
    with pytest.raises(ConfigError) as raised:
        load_config(config)
    assert str(raised.value) == (f"{config} line 5: steps.distill.temprature: distill.py has no flag --temprature; "
                                 "did you mean temperature? settings are its flags without the dashes "
                                 "(python steps/distill.py --help)")


@pytest.mark.smoke
def test_the_step_table_names_real_flags_and_the_definition_wires_exactly_them(steps):
    """Every flag STEPS lists is a flag of its script, and each step of the definition passes what it lists."""
    from flanops.pipelines.step_scripts import step_flags
    from flanops.pipelines.definition import wired_arguments

    for section, step in STEPS.items():
        listed = {*step.passed, *step.container, *step.refused}
        assert listed <= step_flags(section), (section, listed - step_flags(section))
        arguments = steps[step.name]["Arguments"]
        given = (arguments["HyperParameters"] if step.name == NAMES.finetune
                 else arguments["AppSpecification"]["ContainerArguments"])
        assert {"--" + flag.replace("_", "-") for flag in step.passed} - {"--no-runtime-wheel", "--wheelhouse"} \
            <= {("--" + key) if step.name == NAMES.finetune else key for key in given if isinstance(key, str)}, section
    with pytest.raises(ValueError, match="tables.STEPS lists"):
        wired_arguments("prepare", {"input": "x"})   # a flag the table lists but the definition would not pass


@pytest.mark.smoke
def test_lora_defaults_are_the_fine_tune_scripts_own():
    parser = import_step(STEPS["finetune"].script).build_parser()
    assert Parameters().LoraRank == parser.get_default("lora_r")
    assert Parameters().LoraAlpha == parser.get_default("lora_alpha")
    from flanops.benchmarks.harness import cloud_finetune

    cloud = load_config("cloud")
    assert cloud_finetune() == {"lora_r": cloud.parameters.LoraRank, "lora_alpha": cloud.parameters.LoraAlpha,
                                "target_modules": cloud.steps["finetune"]["target_modules"]}


@pytest.mark.smoke
@pytest.mark.parametrize("script", sorted({*(step.script for step in STEPS.values()), "optimize"}))
def test_no_step_script_takes_an_abbreviated_flag(script, capsys):
    """argparse's prefix matching would read --max-step as --max-steps (or --out as --output-dir)."""
    module = import_step(script)
    required = {"prune": ["--method", "structured", "--amount", "0.5"], "quantize": ["--method", "bf16"]}
    abbreviated = (["--var", "distill", "--method", "distill"] if script == "optimize"
                   else [*required.get(script, []), "--out", "x"])
    with pytest.raises(SystemExit) as exited:
        module.parse_args(abbreviated)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert ("required: --variant" if script == "optimize" else "unrecognized arguments: --out x") in err, err


@pytest.mark.smoke
def test_the_cli_takes_no_abbreviated_flag(empty_home, capsys):
    for argv in (["run", "--out", "x"], ["run", "--para", "LoraRank=8"], ["definition", "--conf", "quick"]):
        with pytest.raises(SystemExit) as exited:
            cli.main(argv)
        assert exited.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err
    assert not empty_home.exists()


@pytest.mark.smoke
def test_every_shipped_config_loads():
    paths = shipped_configs()
    assert {p.stem for p in paths} >= {"quick", "cloud"}
    for path in paths:
        config = load_config(path)
        assert config.source == str(path)
        assert re.fullmatch(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,255}", config.pipeline_name)
        assert set(config.steps) <= {"prepare", "select", "finetune", "distill", "quantize", "prune", "evaluate"}
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert config.parameter_values() == {**Parameters().model_dump(), **raw.get("parameters", {})}
    assert load_config("quick").pipeline_name == "flanops-quick"


@pytest.mark.smoke
def test_the_cli_and_the_api_call_the_same_typed_command(empty_home, tmp_path, monkeypatch):
    """`flanops run` parses its arguments into typed values; flanops.api.run passes its own: the same function
    gets the same loaded config and options, and the API's values are never turned into --param text."""
    from flanops.pipelines import api, pipeline_commands, targets

    calls = []
    monkeypatch.setattr(pipeline_commands, "run", lambda config, target, **options: calls.append((config, target, options)) or 0)
    run_dir = tmp_path / "run"
    assert cli.main(["run", "--param", "LoraRank=8", "--param", "steps.finetune.max_steps=5", "--no-deploy",
                     "--output-dir", str(run_dir)]) == 0
    assert api.run(params={"LoraRank": 8, "steps.finetune.max_steps": 5}, output_dir=run_dir, deploy=False).code == 0
    (cli_config, cli_target, cli_options), (api_config, api_target, api_options) = calls
    assert cli_target == api_target == targets.TargetChoice(aws=False)
    assert cli_options == {"output_dir": run_dir, "resume": None, "deploy": False}
    assert api_options == {"output_dir": run_dir, "deploy": False}   # resume: the function's default, None
    for config in (cli_config, api_config):
        assert config.parameters.LoraRank == 8 and config.steps["finetune"]["max_steps"] == 5
    assert api_config.overrides == cli_config.overrides == ["LoraRank=8", "steps.finetune.max_steps=5"]
    assert not empty_home.exists(), "a faked command starts nothing"


def test_the_sdk_validates_a_config_once_and_still_refuses_a_bad_one():
    """validate_sdk_config_once remembers valid configs only: a bad one raises on every lookup."""
    import jsonschema
    from sagemaker.core.config.config_manager import SageMakerConfig

    from flanops.pipelines.definition import SDK_CONFIG, validate_sdk_config_once

    validate_sdk_config_once()
    validate_sdk_config_once()   # idempotent: still one wrapper
    assert SageMakerConfig.validate_sagemaker_config.remembers_valid_configs
    SageMakerConfig.validate_sagemaker_config(SDK_CONFIG)
    bad = {"SchemaVersion": "1.0", "SageMaker": {"PythonSDK": {"Modules": {"TelemetryOptOut": "sometimes"}}}}
    for _ in range(2):
        with pytest.raises(jsonschema.ValidationError):
            SageMakerConfig.validate_sagemaker_config(bad)


def test_without_a_reachable_index_the_runtime_wheel_is_left_out_with_a_warning(aws, tmp_path, monkeypatch, capsys):
    """A laptop gone offline after installing: the client cannot fetch the CTranslate2 wheel, says what that means,
    and Evaluate packs a ct2-int8 model without it (its endpoint installs the runtime from the index)."""
    monkeypatch.setenv("FLANOPS_WHEELHOUSE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    definition = json.loads(aws.build())
    out = capsys.readouterr().out
    assert "warning: cannot fetch the ctranslate2" in out and "cannot serve in a network-isolated stage" in out
    evaluate = {step["Name"]: step for step in iter_steps(definition["Steps"])}[NAMES.evaluate]
    arguments = evaluate["Arguments"]["AppSpecification"]["ContainerArguments"]
    assert "--no-runtime-wheel" in arguments and "--wheelhouse" not in arguments
    assert "wheels" not in {item["InputName"] for item in evaluate["Arguments"]["ProcessingInputs"]}


def test_a_ct2_artifact_without_its_wheel_installs_the_runtime_from_the_index(tmp_path):
    from stepkit.packaging import package_model
    from stepkit.wheels import runtime_version

    folder = tmp_path / "ct2"
    (folder / "ctranslate2").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    archive = package_model(folder, tmp_path / "model.tar.gz", ship_runtime_wheel=False)
    with tarfile.open(archive) as tar:
        requirements = tar.extractfile("code/requirements.txt").read().decode()
        assert not [name for name in tar.getnames() if name.startswith("code/wheels")]
    assert f"ctranslate2=={runtime_version()}" in requirements and "--no-index" not in requirements


@pytest.mark.smoke
@pytest.mark.parametrize("value, flags", [("false", ["--no-gradient-checkpointing"]),
                                          ("true", ["--gradient-checkpointing"])])
def test_a_false_step_setting_reaches_a_script_flag_that_can_be_turned_off(value, flags):
    """``gradient_checkpointing: false`` used to be dropped, so the script's own choice won."""
    from flanops.pipelines.config import load_config

    arguments = load_config("quick", [f"steps.finetune.gradient_checkpointing={value}"]).step_arguments("finetune")
    assert [flag for flag in arguments if "gradient-checkpointing" in flag] == flags
    # a flag that has no --no- form is off by being left out
    select = load_config("quick", ["steps.select.random_weights=false"]).step_arguments("select")
    assert not [flag for flag in select if "random-weights" in flag]


@pytest.mark.smoke
def test_the_sdks_bytecode_is_left_out_of_a_code_location():
    """The SDK uploads its drivers' folder with the __pycache__ of the venv it runs in: the content-addressed copy
    leaves it out, so the same SDK gives the same location (and definition) in every venv."""
    with mocked_aws("us-east-1", "code-bucket") as session:
        s3 = session.client("s3")
        located = []
        for bytecode in (b"compiled by one venv", b"compiled by another"):
            for key, body in {"job-1/sm_drivers/driver.py": b"print('hi')\n",
                              "job-1/sm_drivers/__pycache__/driver.cpython-311.pyc": bytecode}.items():
                s3.put_object(Bucket="code-bucket", Key=key, Body=body)
            located.append(code_locations.relocate(s3, "s3://code-bucket/job-1/sm_drivers", "p", "sm_drivers"))
        assert located[0] == located[1]
        copied = [item["Key"] for item in s3.list_objects_v2(Bucket="code-bucket", Prefix="p/code/")["Contents"]]
        assert copied == [located[0].removeprefix("s3://code-bucket/") + "/driver.py"]
