"""The definition's expressions, evaluated as SageMaker does: parameters, execution variables, ``Get`` of step
properties, ``Std:Join``, ``Std:JsonGet`` (a property file or a JSON object in S3, read with a JSON path) and
conditions (Equals, GreaterThan(OrEqualTo), LessThan(OrEqualTo), In, Not, Or)."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from .failures import StepFailed
from .records import utcnow

PATH_TOKEN = re.compile(r"\.?([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\['([^']*)'\]|\[\"([^\"]*)\"\]")


def walk_path(value: Any, path: str, what: str) -> Any:
    """Follow a SageMaker property path (``Outputs['data'].S3Output.S3Uri``) through a response."""
    position = 0
    while position < len(path):
        match = PATH_TOKEN.match(path, position)
        if not match:
            raise StepFailed(f"{what}: cannot read property path {path!r} at {path[position:]!r}")
        position = match.end()
        name, index, key1, key2 = match.groups()
        key = key1 if key1 is not None else key2
        if name is not None:
            if not isinstance(value, dict) or name not in value:
                raise StepFailed(f"{what}: no property {name!r} in {path!r}")
            value = value[name]
        elif index is not None:
            value = value[int(index)]
        elif isinstance(value, list):   # Outputs['data']: the element whose *Name is 'data'
            found = [item for item in value if isinstance(item, dict)
                     and any(k.endswith("Name") and v == key for k, v in item.items())]
            if not found:
                raise StepFailed(f"{what}: no element named {key!r} in {path!r}")
            value = found[0]
        else:
            value = value[key]
    return value


def json_path(document: Any, path: str, what: str) -> Any:
    """``Std:JsonGet`` paths: dotted names, ``[index]`` and ``['key']`` (JsonPath, with or without its ``$``)."""
    value = document
    for name, index, key1, key2 in JSON_PATH_TOKEN.findall(path.removeprefix("$").lstrip(".")):
        try:
            value = value[int(index)] if index else value[name or key1 or key2]
        except (KeyError, IndexError, TypeError, ValueError):
            raise StepFailed(f"{what}: {path!r} is not in the JSON document") from None
    return value


JSON_PATH_TOKEN = re.compile(r"([^.\[\]]+)|\[(-?\d+)\]|\['([^']*)'\]|\[\"([^\"]*)\"\]")
# Every ExecutionVariable the SDK has (sagemaker.core.workflow.execution_variables.ExecutionVariables).
EXECUTION_VARIABLES = ("StartDateTime", "CurrentDateTime", "PipelineName", "PipelineArn", "PipelineExecutionId",
                       "PipelineExecutionArn", "TrainingJobName", "ProcessingJobName")
JOB_NAME_VARIABLES = {"TrainingJobName": "Training", "ProcessingJobName": "Processing"}   # → the step type they name


def job_name(pipeline_name: str, step_name: str, execution_id: str) -> str:
    """The name of a step's job (or model) in an execution: unique per step and execution, and one that
    SageMaker accepts (letters, digits and hyphens, at most 63)."""
    return re.sub(r"[^a-zA-Z0-9-]+", "-", f"{pipeline_name}-{step_name}-{execution_id}")[:63].strip("-")


@dataclass
class Context:
    execution_id: str
    execution_arn: str
    pipeline_name: str
    parameters: dict[str, Any]
    properties: dict[str, dict] = field(default_factory=dict)       # step → its Describe*-like response
    property_files: dict[str, dict] = field(default_factory=dict)   # "Step.File" → parsed JSON
    start_time: str = ""                                            # Execution.StartDateTime: the record's CreationTime
    read_s3: Callable[[str], bytes] | None = None                   # an object's bytes, for JsonGet with an S3Uri
    step: tuple[str, str] | None = None                             # (name, type) of the step whose arguments these are

    def for_step(self, name: str, step_type: str) -> "Context":
        """The same execution seen from one step (its Execution.TrainingJobName or ProcessingJobName)."""
        return replace(self, step=(name, step_type))

    def resolve(self, value: Any, what: str = "definition") -> Any:
        if isinstance(value, list):
            return [self.resolve(item, what) for item in value]
        if not isinstance(value, dict):
            return value
        if set(value) == {"Get"}:
            return self.get(value["Get"], what)
        if set(value) == {"Std:Join"}:
            join = value["Std:Join"]
            return str(join.get("On", "")).join(format_value(self.resolve(v, what)) for v in join["Values"])
        if set(value) == {"Std:JsonGet"}:
            return self.json_get(value["Std:JsonGet"], what)
        return {key: self.resolve(item, what) for key, item in value.items()}

    def json_get(self, spec: dict, what: str) -> Any:
        """A value from a step's property file, or from a JSON object in S3 (``S3Uri``: what ``@step``
        functions and newer property files give)."""
        if "S3Uri" in spec:
            uri = format_value(self.resolve(spec["S3Uri"], what))
            if self.read_s3 is None:
                raise StepFailed(f"{what}: Std:JsonGet reads {uri}, but no S3 client was given")
            try:
                document = json.loads(self.read_s3(uri))
            except ValueError as err:
                raise StepFailed(f"{what}: Std:JsonGet: {uri} is not JSON ({err})") from None
            return json_path(document, spec["Path"], f"{what}: Std:JsonGet {uri}")
        reference = spec["PropertyFile"]["Get"] if isinstance(spec["PropertyFile"], dict) else spec["PropertyFile"]
        step, _, file_name = reference.removeprefix("Steps.").partition(".PropertyFiles.")
        document = self.property_files.get(f"{step}.{file_name}")
        if document is None:
            raise StepFailed(f"{what}: property file {file_name} of step {step} is not available")
        return json_path(document, spec["Path"], f"{what}: {reference}")

    def get(self, reference: str, what: str) -> Any:
        scope, _, rest = reference.partition(".")
        if scope == "Parameters":
            if rest not in self.parameters:
                raise StepFailed(f"{what}: unknown parameter {rest!r}")
            return self.parameters[rest]
        if scope == "Execution":
            return self.execution_variable(rest, what)
        if scope == "Steps":
            step, _, path = rest.partition(".")
            if step not in self.properties:
                raise StepFailed(f"{what}: step {step!r} has not run, so its properties are unknown")
            return walk_path(self.properties[step], path, f"{what}: Steps.{step}")
        raise StepFailed(f"{what}: cannot resolve {reference!r}")

    def execution_variable(self, name: str, what: str) -> str:
        if name in JOB_NAME_VARIABLES:
            if self.step is None or self.step[1] != JOB_NAME_VARIABLES[name]:
                raise StepFailed(f"{what}: Execution.{name} is only defined in a {JOB_NAME_VARIABLES[name]} step's "
                                 "arguments")
            return job_name(self.pipeline_name, self.step[0], self.execution_id)
        values = {"PipelineExecutionId": self.execution_id, "PipelineExecutionArn": self.execution_arn,
                  "PipelineName": self.pipeline_name, "PipelineArn": self.execution_arn.partition("/execution/")[0],
                  "StartDateTime": self.start_time, "CurrentDateTime": utcnow()}
        if name not in values:
            raise StepFailed(f"{what}: unknown execution variable Execution.{name}")
        return values[name]


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def evaluate_condition(condition: dict, ctx: Context, what: str) -> bool:
    kind = condition["Type"]
    if kind == "Not":   # the SDK's ConditionNot writes "Condition"; "Expression" is kept for older hand-written JSON
        return not evaluate_condition(condition.get("Condition", condition.get("Expression")), ctx, what)
    if kind == "Or":
        return any(evaluate_condition(c, ctx, what) for c in condition["Conditions"])
    if kind == "In":
        return ctx.resolve(condition["QueryValue"], what) in ctx.resolve(condition["Values"], what)
    left, right = ctx.resolve(condition["LeftValue"], what), ctx.resolve(condition["RightValue"], what)
    compare: dict[str, Callable[[Any, Any], bool]] = {
        "Equals": lambda a, b: a == b, "GreaterThan": lambda a, b: a > b,
        "GreaterThanOrEqualTo": lambda a, b: a >= b, "LessThan": lambda a, b: a < b,
        "LessThanOrEqualTo": lambda a, b: a <= b}
    if kind not in compare:
        raise StepFailed(f"{what}: condition type {kind!r} is not supported by the local executor")
    try:
        return compare[kind](left, right)
    except TypeError:
        raise StepFailed(f"{what}: cannot compare {left!r} with {right!r} ({kind})") from None


def nodes(value: Any) -> Iterator[dict]:
    """Every mapping in an expression (or a step's arguments), outermost first."""
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from nodes(item)
    elif isinstance(value, list):
        for item in value:
            yield from nodes(item)


def gets(value: Any) -> Iterator[str]:
    """Every reference an expression makes: ``Get`` strings (a JsonGet's property file among them)."""
    for node in nodes(value):
        if isinstance(node.get("Get"), str):
            yield node["Get"]
        if isinstance(node.get("PropertyFile"), str):   # JsonGet's property file named without a Get
            yield node["PropertyFile"]


def references(value: Any) -> set[str]:
    """Names of the steps an expression reads."""
    return {reference.split(".")[1] for reference in gets(value) if reference.startswith("Steps.")}
