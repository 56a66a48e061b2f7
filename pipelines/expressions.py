"""The definition's expressions, evaluated as SageMaker does: parameters, ``Get`` of step properties,
``Std:Join``, ``Std:JsonGet`` (property files read with a JSON path) and conditions."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
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
    """``Std:JsonGet`` paths: dotted names with ``[index]`` (JsonPath without the ``$``)."""
    value = document
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        try:
            value = value[int(part[1:-1])] if part.startswith("[") else value[part]
        except (KeyError, IndexError, TypeError):
            raise StepFailed(f"{what}: {path!r} is not in the property file") from None
    return value


@dataclass
class Context:
    execution_id: str
    execution_arn: str
    pipeline_name: str
    parameters: dict[str, Any]
    properties: dict[str, dict] = field(default_factory=dict)       # step → its Describe*-like response
    property_files: dict[str, dict] = field(default_factory=dict)   # "Step.File" → parsed JSON

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
            spec = value["Std:JsonGet"]
            reference = spec["PropertyFile"]["Get"] if isinstance(spec["PropertyFile"], dict) else spec["PropertyFile"]
            step, _, file_name = reference.removeprefix("Steps.").partition(".PropertyFiles.")
            document = self.property_files.get(f"{step}.{file_name}")
            if document is None:
                raise StepFailed(f"{what}: property file {file_name} of step {step} is not available")
            return json_path(document, spec["Path"], f"{what}: {reference}")
        return {key: self.resolve(item, what) for key, item in value.items()}

    def get(self, reference: str, what: str) -> Any:
        scope, _, rest = reference.partition(".")
        if scope == "Parameters":
            if rest not in self.parameters:
                raise StepFailed(f"{what}: unknown parameter {rest!r}")
            return self.parameters[rest]
        if scope == "Execution":
            values = {"PipelineExecutionId": self.execution_id, "PipelineExecutionArn": self.execution_arn,
                      "PipelineName": self.pipeline_name, "StartDateTime": utcnow(), "CurrentDateTime": utcnow()}
            return values[rest]
        if scope == "Steps":
            step, _, path = rest.partition(".")
            if step not in self.properties:
                raise StepFailed(f"{what}: step {step!r} has not run, so its properties are unknown")
            return walk_path(self.properties[step], path, f"{what}: Steps.{step}")
        raise StepFailed(f"{what}: cannot resolve {reference!r}")


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def evaluate_condition(condition: dict, ctx: Context, what: str) -> bool:
    kind = condition["Type"]
    if kind == "Not":
        return not evaluate_condition(condition["Expression"], ctx, what)
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


def references(value: Any) -> set[str]:
    """Names of the steps an expression reads."""
    found: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "Get" and isinstance(item, str) and item.startswith("Steps."):
                found.add(item.split(".")[1])
            else:
                found |= references(item)
    elif isinstance(value, list):
        for item in value:
            found |= references(item)
    return found
