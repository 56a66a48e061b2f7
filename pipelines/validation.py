"""What the local executor refuses before anything starts, each in one line: the step, the construct, what to do.

A definition is refused when it holds a step type the executor does not run (``REFUSED`` says why for each
type the SDK writes), a job it cannot run as a process of this machine, a reference to a step, parameter,
property file or execution variable that does not exist, a run condition it does not know, a retry policy
without an end, or steps that wait for each other in a cycle.
"""
from __future__ import annotations

from typing import Iterable

from .errors import FlanopsError
from .expressions import EXECUTION_VARIABLES, JOB_NAME_VARIABLES, gets, nodes
from .failures import DefinitionRefused
from .jobs import processing_problem, training_problem
from .retries import max_interval
from .stepcache import parse_duration
from .stepgraph import TRIGGERS, StepGraph, own_arguments

ON_SAGEMAKER = "run this pipeline on SageMaker instead (`flanops run --aws`)"
# Step types the SDK can write that do not run here, and why; each refusal ends with what to do.
REFUSED = {
    "Lambda": "a Lambda step invokes an AWS Lambda function, which embedded AWS does not run; "
              f"{ON_SAGEMAKER}, or do its work in a ProcessingStep",
    "EMR": "an EMR step submits work to an Amazon EMR cluster, which does not exist here; "
           f"{ON_SAGEMAKER}, or do its work in a ProcessingStep",
    "EMRServerless": "an EMRServerless step submits a job to an EMR Serverless application, which does not exist "
                     f"here; {ON_SAGEMAKER}, or do its work in a ProcessingStep",
    "Tuning": "a Tuning step starts a hyperparameter tuning job, whose search SageMaker's tuner drives; "
              f"{ON_SAGEMAKER}, or train with fixed hyperparameters in a TrainingStep",
    "AutoML": "an AutoML step starts an Autopilot job, whose candidates SageMaker generates; "
              f"{ON_SAGEMAKER}, or train your own model in a TrainingStep",
    "ClarifyCheck": "a ClarifyCheck step runs SageMaker Clarify's container, which is not available here; "
                    f"{ON_SAGEMAKER}, or compute the check in a ProcessingStep",
    "QualityCheck": "a QualityCheck step runs SageMaker Model Monitor's analyzer container, which is not available "
                    f"here; {ON_SAGEMAKER}, or compute the statistics in a ProcessingStep",
    "Callback": "a Callback step waits for an outside system to call SendPipelineExecutionStepSuccess through "
                f"Amazon SQS, which the local executor does not offer; {ON_SAGEMAKER}",
    "NotebookJob": "a NotebookJobStep runs a notebook in a SageMaker Distribution image's kernel, which the local "
                   f"executor does not provide; {ON_SAGEMAKER}, or run the notebook's code in a ProcessingStep",
    "Endpoint": "an Endpoint step deploys to a SageMaker endpoint; deploy the registered model with "
                f"`flanops deploy` after the run, or {ON_SAGEMAKER}",
    "EndpointConfig": "an EndpointConfig step creates an endpoint configuration for deployment; deploy the "
                      f"registered model with `flanops deploy` after the run, or {ON_SAGEMAKER}",
    "InferenceComponent": "an InferenceComponent step deploys onto a SageMaker endpoint; deploy the registered "
                          f"model with `flanops deploy` after the run, or {ON_SAGEMAKER}",
    "Lineage": f"a Lineage step writes SageMaker ML Lineage entities, which embedded AWS does not keep; {ON_SAGEMAKER}",
    "Job": f"a Job step calls SageMaker's CreateJob API, which embedded AWS does not offer; {ON_SAGEMAKER}",
    "Cleanup": f"a Cleanup step deletes SageMaker resources of the execution, which the local executor does not "
               f"track; {ON_SAGEMAKER}, or remove the step",
    "ForEach": f"a ForEach step fans its body out over a list, which the local executor does not do yet; "
               f"{ON_SAGEMAKER}, or write out one step per item",
}
FUNCTIONS = {"Std:Join", "Std:JsonGet"}
CONDITION_TYPES = {"Equals", "GreaterThan", "GreaterThanOrEqualTo", "LessThan", "LessThanOrEqualTo", "In", "Not", "Or"}
EXCEPTION_TYPES = {"Step.SERVICE_FAULT", "Step.THROTTLING", "SageMaker.JOB_INTERNAL_ERROR", "SageMaker.CAPACITY_ERROR",
                   "SageMaker.RESOURCE_LIMIT"}


def kind_of(step: dict) -> str:
    """The step's type, with what the SDK writes as a Training step told apart: a notebook job, an @step function."""
    arguments = step.get("Arguments", {})
    if step.get("Type") == "Training":
        tags = {tag.get("Key") for tag in arguments.get("Tags", []) if isinstance(tag, dict)}
        if "sagemaker:notebook-job-origin" in tags or "SM_INPUT_NOTEBOOK_NAME" in arguments.get("Environment", {}):
            return "NotebookJob"
        if "remote_function" in str(arguments.get("AlgorithmSpecification", {}).get("ContainerEntrypoint")):
            return "Function"
    return str(step.get("Type"))


def check_definition(definition: dict, runnable: Iterable[str], parameters: Iterable[str] = ()) -> StepGraph:
    """The definition's step graph when the local executor can run it; else DefinitionRefused, in one line."""
    graph = StepGraph.of(definition)
    declared = {p.get("Name") for p in definition.get("Parameters", [])}
    unknown = sorted(set(parameters) - declared)
    if unknown:
        refuse(f"pipeline parameter(s) {unknown} are not in the definition, which has {sorted(declared)}; "
               "pass only those")
    if graph.duplicates:
        refuse(f"step {graph.duplicates[0]!r}: the name is given to more than one step; give each step its own name")
    for name, step in graph.steps.items():
        check_kind(name, step, set(runnable))
    for name, step in graph.steps.items():
        check_references(name, step, graph, declared)
        check_retry_policies(name, step)
        expire_after = step.get("CacheConfig", {}).get("ExpireAfter")
        if expire_after is not None and parse_duration(expire_after) is None:
            refuse(f"step {name!r}: CacheConfig ExpireAfter {expire_after!r} is not an ISO 8601 duration; write it "
                   "like P30D, PT12H or P1W")
    cycle = graph.cycle()
    if cycle:
        refuse(f"step {cycle[0]!r}: DependsOn and property references form a cycle ({' → '.join(cycle)}), so no "
               "step of it can start; remove one of those dependencies")
    return graph


def refuse(message: str) -> None:
    raise DefinitionRefused(f"{message}. Nothing was started.")


def check_kind(name: str, step: dict, runnable: set[str]) -> None:
    kind = kind_of(step)
    if kind in REFUSED and kind not in runnable:
        refuse(f"step {name!r}: {REFUSED[kind]}")
    if kind not in runnable:
        refuse(f"step {name!r}: step type {kind!r} is unknown to the local executor (it runs "
               f"{', '.join(sorted(runnable))}); {ON_SAGEMAKER}")
    arguments = step.get("Arguments", {})
    problem = None
    if kind == "Processing":
        problem = processing_problem(arguments.get("AppSpecification", {}),
                                     {i.get("InputName") for i in arguments.get("ProcessingInputs", [])})
    elif kind == "Training":
        problem = training_problem(arguments)
    if problem:
        refuse(f"step {name!r}: {problem}; {ON_SAGEMAKER}")


def check_references(name: str, step: dict, graph: StepGraph, parameters: set[str]) -> None:
    where = f"step {name!r}"
    expressions = own_arguments(step)
    for reference in gets(expressions):
        scope, _, rest = reference.partition(".")
        if scope == "Parameters" and rest not in parameters:
            refuse(f"{where}: Get {reference} names a parameter the definition does not declare (it has "
                   f"{sorted(parameters)}); declare it in the pipeline's parameters or fix the name")
        elif scope == "Execution":
            if rest not in EXECUTION_VARIABLES:
                refuse(f"{where}: Get {reference} is not an execution variable (they are "
                       f"{', '.join(EXECUTION_VARIABLES)}); use one of those")
            if rest in JOB_NAME_VARIABLES and kind_of(step) != JOB_NAME_VARIABLES[rest]:
                refuse(f"{where}: Get {reference} has a value only in a {JOB_NAME_VARIABLES[rest]} step's arguments, "
                       f"and this is a {kind_of(step)} step; read the job's name from that step's properties")
        elif scope == "Steps":
            check_step_reference(where, reference, graph)
        elif scope not in ("Parameters", "Execution"):
            refuse(f"{where}: Get {reference} refers to nothing the executor knows (Parameters., Execution. or "
                   "Steps.); fix the reference")
    for node in nodes(expressions):
        for key in node:
            if key.startswith("Std:") and key not in FUNCTIONS:
                refuse(f"{where}: the function {key} is not one the local executor evaluates "
                       f"({', '.join(sorted(FUNCTIONS))}); {ON_SAGEMAKER}")
    if step.get("Type") == "Condition":
        for condition in nodes(step.get("Arguments", {}).get("Conditions", [])):
            kind = condition.get("Type")
            if kind is not None and kind not in CONDITION_TYPES:
                refuse(f"{where}: condition type {kind!r} is not one SageMaker has ({', '.join(sorted(CONDITION_TYPES))}"
                       "); fix the condition")
    for upstream, trigger in graph.depends_on(name).items():
        if upstream not in graph.steps:
            refuse(f"{where}: DependsOn names {upstream!r}, which is not a step of this pipeline; fix the name or "
                   "remove it")
        if trigger not in TRIGGERS:
            refuse(f"{where}: DependsOn {upstream!r} with Trigger {trigger!r}, which is not a run condition "
                   f"({', '.join(TRIGGERS)}); use one of those")


def check_step_reference(where: str, reference: str, graph: StepGraph) -> None:
    parts = reference.split(".")
    if len(parts) < 2 or parts[1] not in graph.steps:
        refuse(f"{where}: Get {reference} reads the properties of step {parts[1] if len(parts) > 1 else ''!r}, which "
               "is not a step of this pipeline; fix the name or add the step")
    if len(parts) > 2 and parts[2] == "PropertyFiles":
        files = {spec.get("PropertyFileName") for spec in graph.steps[parts[1]].get("PropertyFiles", [])}
        file_name = ".".join(parts[3:])
        if file_name not in files:
            refuse(f"{where}: JsonGet reads property file {file_name!r} of step {parts[1]!r}, which declares "
                   f"{sorted(files) or 'none'}; add it to that step's property_files or fix the name")


def check_retry_policies(name: str, step: dict) -> None:
    if step.get("RetryPolicies"):
        try:
            max_interval()
        except FlanopsError as err:
            refuse(f"step {name!r} has retry policies, and {err}")
    for policy in step.get("RetryPolicies", []):
        unknown = sorted(set(policy.get("ExceptionType", [])) - EXCEPTION_TYPES)
        if unknown:
            refuse(f"step {name!r}: retry policy exception type(s) {unknown} are not SageMaker's "
                   f"({', '.join(sorted(EXCEPTION_TYPES))}); use those")
        if "MaxAttempts" not in policy and "ExpireAfterMin" not in policy:
            refuse(f"step {name!r}: a retry policy needs MaxAttempts or ExpireAfterMin, else it retries forever; "
                   "give it one")
