"""Selective execution: only the selected steps run; every other step's outputs come from a source execution.

``SelectiveExecutionConfig`` is StartPipelineExecution's: ``{"SourcePipelineExecutionArn": …, "SelectedSteps":
[{"StepName": …}]}``. The source must be an execution of the same pipeline that has ended, in which every step a
selected step reads from (and is not selected itself) succeeded; as SageMaker requires, a step that lies between
two selected steps must be selected too. The steps not selected that succeeded in the source are listed in the
new execution as they were, with ``SelectiveExecutionResult`` naming the source, and their properties, property
files and condition outcomes are the source's. Anything else is refused before a step starts.
"""
from __future__ import annotations

from dataclasses import dataclass

from .failures import DefinitionRefused, StepFailed
from .records import load_execution
from .stepgraph import StepGraph


@dataclass
class SelectivePlan:
    config: dict                 # the SelectiveExecutionConfig, as the execution records it
    selected: set[str]
    entries: list[dict]          # the source's entries of the steps that are not selected, marked as such
    properties: dict[str, dict]
    property_files: dict[str, dict]


def refuse(message: str) -> None:
    raise DefinitionRefused(f"SelectiveExecutionConfig: {message}. Nothing was started.")


def selective_plan(config: dict, graph: StepGraph, home, pipeline_name: str) -> SelectivePlan:
    source_arn = config.get("SourcePipelineExecutionArn")
    selected = [item.get("StepName") for item in config.get("SelectedSteps", []) if isinstance(item, dict)]
    if not source_arn:
        refuse("no SourcePipelineExecutionArn; name the execution whose outputs the steps not selected reuse")
    if not selected:
        refuse("no SelectedSteps; list the steps to run as [{\"StepName\": …}]")
    unknown = [name for name in selected if name not in graph.steps]
    if unknown:
        refuse(f"selected step(s) {unknown} are not steps of {pipeline_name}; select among {sorted(graph.steps)}")
    if f":pipeline/{pipeline_name}/execution/" not in source_arn and "/" in source_arn:
        refuse(f"source execution {source_arn} is not an execution of pipeline {pipeline_name}; name one of its own")
    try:
        source = load_execution(home, pipeline_name, source_arn)
    except StepFailed as err:
        refuse(f"source execution {source_arn.rsplit('/', 1)[-1]}: {err}")
    if source.get("PipelineName") != pipeline_name:
        refuse(f"source execution {source_arn} ran pipeline {source.get('PipelineName')!r}, not {pipeline_name!r}")
    if source["PipelineExecutionStatus"] == "Executing":
        refuse(f"source execution {source['ExecutionId']} is still running; wait for it to end")
    succeeded = {s["StepName"]: s for s in source["Steps"] if s["StepStatus"] == "Succeeded"}
    chosen = set(selected)
    for name in selected:
        for upstream in sorted(graph.upstream(name)):
            if upstream not in chosen and upstream not in succeeded:
                refuse(f"selected step {name!r} needs step {upstream!r}, which did not succeed in source execution "
                       f"{source['ExecutionId']}; select {upstream!r} too, or choose a source where it succeeded")
        if name in graph.branch_of:
            condition, branch = graph.branch_of[name]
            outcome = succeeded.get(condition, {}).get("Metadata", {}).get("Condition", {}).get("Outcome")
            if condition not in chosen and outcome != str(branch):
                refuse(f"selected step {name!r} is in a branch of condition {condition!r} that source execution "
                       f"{source['ExecutionId']} did not take; select {condition!r} too")
    for name in sorted(set(graph.steps) - chosen):
        between = graph.descendants(name) & chosen
        if between and any(name in graph.descendants(other) for other in chosen):
            refuse(f"step {name!r} lies between selected steps (it reads from one and {sorted(between)[0]!r} reads "
                   f"from it); select {name!r} too")
    arn = source["PipelineExecutionArn"]
    entries = [{**entry, "SelectiveExecutionResult": {"SourcePipelineExecutionArn": arn}}
               for name, entry in succeeded.items() if name not in chosen]
    kept = {entry["StepName"] for entry in entries}
    return SelectivePlan(
        config={"SourcePipelineExecutionArn": arn, "SelectedSteps": [{"StepName": name} for name in selected]},
        selected=chosen, entries=entries,
        properties={k: v for k, v in source.get("Properties", {}).items() if k in kept},
        property_files={k: v for k, v in source.get("PropertyFiles", {}).items() if k.split(".")[0] in kept})
