"""A function step (the SDK's ``@step``): the SDK's own remote-function invoker, run as a job of this machine.

The SDK compiles an ``@step`` function into a Training step whose container runs
``job_driver.sh`` (:data:`ENTRYPOINT`): the bootstrap unpacks the workspace and installs the
dependencies, then ``python -m sagemaker.core.remote_function.invoke_function`` runs with the
job's ContainerArguments. The contract, as sagemaker 3.27 writes and reads it:

- ``--s3_base_uri s3://<bucket>/<pipeline>``, ``--pipeline_step_name``, ``--func_step_s3_dir <build
  time>``: the function and its arguments are at ``<base>/<step>/<build time>/{function,arguments}/``,
  each a ``payload.pkl`` (cloudpickle) and a ``metadata.json`` (its SHA-256, signed with the private
  key of the pipeline's build);
- ``REMOTE_FUNCTION_SECRET_KEY`` (the job's Environment): the public key (PEM) the invoker checks
  those signatures with; there is no shared secret;
- ``--pipeline_execution_id`` and ``--property_references NAME VALUE ...``: the execution id and the
  values of the parameters, execution variables and upstream ``OutputDataConfig.S3OutputPath`` the
  arguments use (an upstream ``DelayedReturn`` is read from there);
- the return value goes to ``<base>/<step>/<build time>/<execution id>/results/`` (``payload.pkl``,
  ``metadata.json`` with a plain SHA-256), the job's ``OutputDataConfig.S3OutputPath``, where
  ``get_function_step_result`` / ``PipelineExecution.result`` read it after DescribeTrainingJob;
  with ``--serialize_output_to_json true`` (the SDK adds it when a step reads the return through
  ``Std:JsonGet``) also ``results/results.json``, ``{"Result": value, "Exception": null}``, which is
  that JsonGet's ``S3Uri`` (``Join([S3OutputPath, "results.json"])``);
- a failure's exception goes to ``<base>/<execution id>/<step>/exception/`` and its ``repr`` to
  ``/opt/ml/output/failure`` (the job's FailureReason).

Here the invoker runs in a subprocess of this Python under jobs.py's process contract (this
machine's environment with the job's Environment and embedded AWS's endpoint, through which the
invoker reads and writes S3 itself), in the workspace the bootstrap makes (the ``workspace.zip``
channel unpacked, or an empty folder), with ``/opt/ml/output/failure`` in the sandbox. What the
bootstrap would install must already be here, else the step is refused in one line: the
dependencies file (requirements.txt; a conda environment file always) and pre-execution commands
(pip installs of what this Python has pass; any other command is refused: it would change this
machine). A function serialized by another Python version, a conda environment and torchrun or
mpirun are refused too. The finished job is recorded in the target's SageMaker
(CreateTrainingJob, which moto completes at once) so that DescribeTrainingJob answers the SDK's
result readers.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Callable

from packaging.requirements import InvalidRequirement

from .expressions import format_value
from .failures import StepFailed
from .jobs import CONTAINER_ROOT, JobRunner, requirements_refusal, unmet_requirements
from .s3 import download_prefix

# sagemaker.core.remote_function.job: JOBS_CONTAINER_ENTRYPOINT, the workspace the driver changes into,
# the channel of dependencies and pre-execution script; bootstrap_runtime_environment: PRE_EXECUTION_SCRIPT_NAME
ENTRYPOINT = ["/bin/bash", f"{CONTAINER_ROOT}/input/data/sagemaker_remote_function_bootstrap/job_driver.sh"]
WORKSPACE = "sagemaker_remote_function_workspace"
SETUP_CHANNEL = "pre_exec_script_and_dependencies"
PRE_EXECUTION_SCRIPT = "pre_exec.sh"
RESULTS = "results"            # the sandbox's copy of the results (the step cache's local copy)
# The invoker, with the container's /opt/ml/output/failure (its first argument) in the sandbox
INVOKER = ("import runpy, sys\n"
           "import sagemaker.core.remote_function.errors as errors\n"
           "errors.FAILURE_REASON_PATH = sys.argv.pop(1)\n"
           "runpy.run_module('sagemaker.core.remote_function.invoke_function', run_name='__main__', alter_sys=True)\n")
PIP_INSTALL = re.compile(r"(?:python3?(?:\.\d+)?\s+-m\s+)?pip3?\s+install\s+(.*)")
PIP_VALUE_OPTIONS = {"-i", "--index-url", "--extra-index-url", "-f", "--find-links", "-c", "--constraint",
                     "--root-user-action", "--upgrade-strategy", "--cache-dir", "--progress-bar"}


def is_function_step(step: dict) -> bool:
    """A Training step whose job runs the SDK's remote-function driver (the test get_function_step_result makes)."""
    specification = step.get("Arguments", {}).get("AlgorithmSpecification", {})
    return step.get("Type") == "Training" and specification.get("ContainerEntrypoint") == ENTRYPOINT


def function_results_uri(properties: dict) -> str | None:
    """Where a function step's job put its return value (its OutputDataConfig.S3OutputPath); None for other jobs."""
    if properties.get("AlgorithmSpecification", {}).get("ContainerEntrypoint") != ENTRYPOINT:
        return None
    return properties.get("OutputDataConfig", {}).get("S3OutputPath")


def container_flags(arguments: list[str]) -> dict[str, list[str]]:
    """``--name value ...`` → {"--name": [values]} (``--property_references`` takes pairs)."""
    flags: dict[str, list[str]] = {}
    current = None
    for token in arguments:
        if token.startswith("--"):
            current = flags.setdefault(token, [])
        elif current is not None:
            current.append(token)
    return flags


def check_runtime(name: str, flags: dict[str, list[str]]) -> None:
    """What the bootstrap and the driver would do differently from one process of this Python."""
    wanted = (flags.get("--client_python_version") or [""])[0]
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if wanted and wanted != here:
        raise StepFailed(f"{name}: the function was serialized by Python {wanted} and this is Python {here}; "
                         "cloudpickle needs the same version (the job's bootstrap refuses it too)")
    for flag, what in (("--job_conda_env", "a conda environment"), ("--distribution", "a distributed launcher")):
        if flags.get(flag):
            raise StepFailed(f"{name}: the function step runs in {what} ({flags[flag][0]}); the local executor "
                             "runs it as one process of this Python")


def check_setup(name: str, workspace: Path, flags: dict[str, list[str]]) -> None:
    """The dependencies file and pre-execution commands: already satisfied here, or refused in one line."""
    settings = json.loads((flags.get("--dependency_settings") or ["{}"])[0] or "{}")
    dependencies = settings.get("dependency_file")
    if dependencies:
        path = workspace / dependencies
        if not path.is_file():
            raise StepFailed(f"{name}: the function step's dependencies file {dependencies} is not among its staged "
                             f"inputs ({SETUP_CHANNEL})")
        if path.suffix in (".yml", ".yaml"):
            raise StepFailed(f"{name}: the function step's dependencies are a conda environment ({dependencies}); "
                             "the local executor does not create environments: run it with this Python's packages")
        check_requirements(name, f"the function step's dependencies ({dependencies})",
                           path.read_text(encoding="utf-8").splitlines())
    script = workspace / PRE_EXECUTION_SCRIPT
    if script.is_file():
        for line in script.read_text(encoding="utf-8").splitlines():
            check_pre_execution_command(name, line.strip(), workspace)


def check_pre_execution_command(name: str, command: str, workspace: Path) -> None:
    if not command or command.startswith("#"):
        return
    match = PIP_INSTALL.fullmatch(command)
    if not match:
        raise StepFailed(f"{name}: the pre-execution command {command!r} would run on this machine, not in a "
                         "container; the local executor runs only pip installs of what this Python already has")
    tokens, specifiers = shlex.split(match.group(1)), []
    while tokens:
        token = tokens.pop(0)
        if token in ("-r", "--requirement") and tokens:
            listed = workspace / tokens.pop(0)
            if not listed.is_file():
                raise StepFailed(f"{name}: the pre-execution command {command!r} names {listed.name}, which the "
                                 "function step's workspace does not hold")
            specifiers += listed.read_text(encoding="utf-8").splitlines()
        elif token in PIP_VALUE_OPTIONS and tokens:
            tokens.pop(0)
        elif not token.startswith("-"):
            specifiers.append(token)
    check_requirements(name, f"the pre-execution command {command!r}", specifiers)


def check_requirements(name: str, what: str, lines: list[str]) -> None:
    try:
        missing = unmet_requirements(lines)
    except InvalidRequirement as err:
        raise StepFailed(f"{name}: {what}: cannot check {err} against this Python's packages") from None
    if missing:
        raise requirements_refusal(name, what, missing)


def stage_workspace(jobs: JobRunner, name: str, arguments: dict, flags: dict[str, list[str]], sandbox: Path) -> Path:
    """The channels staged, and the folder the driver runs the invoker in, as the bootstrap leaves it."""
    data_root = jobs.sandbox_path(sandbox, f"{CONTAINER_ROOT}/input/data")
    channels = {}
    for channel in arguments.get("InputDataConfig", []):
        channels[channel["ChannelName"]] = folder = data_root / channel["ChannelName"]
        download_prefix(jobs.s3, channel["DataSource"]["S3DataSource"]["S3Uri"], folder)
    build = (flags.get("--func_step_s3_dir") or [""])[0]
    archive = channels[build] / "workspace.zip" if build in channels else None
    if archive is not None and archive.is_file():
        shutil.unpack_archive(archive, sandbox / "job")    # include_local_workdir: the user's files
    workspace = sandbox / "job" / WORKSPACE
    workspace.mkdir(parents=True, exist_ok=True)
    if SETUP_CHANNEL in channels:
        for path in channels[SETUP_CHANNEL].iterdir():
            shutil.copy(path, workspace / path.name)
    check_setup(name, workspace, flags)
    return workspace


def run_function(jobs: JobRunner, name: str, job_name: str, arguments: dict, sandbox: Path, entry: dict,
                 started: Callable[[], None]) -> dict:
    """One function step's job; returns its properties (DescribeTrainingJob)."""
    # the SDK reads the job's name from its ARN, which is lower case, and moto's job names are case-sensitive
    job_name = job_name.lower()
    container_arguments = [format_value(value) for value in arguments["AlgorithmSpecification"].get(
        "ContainerArguments", [])]
    flags = container_flags(container_arguments)
    check_runtime(name, flags)
    jobs.fresh_sandbox(sandbox)
    # first in the step's metadata, as SageMaker lists it: the SDK's result reader takes the first entry
    entry["Metadata"]["TrainingJob"] = {"Arn": jobs.job_arn("training-job", job_name)}
    workspace = stage_workspace(jobs, name, arguments, flags, sandbox)
    failure = jobs.sandbox_path(sandbox, f"{CONTAINER_ROOT}/output/failure")
    failure.parent.mkdir(parents=True, exist_ok=True)
    jobs.sandbox_path(sandbox, f"{CONTAINER_ROOT}/model").mkdir(parents=True, exist_ok=True)
    env = jobs.container_env(sandbox, job_name, arguments.get("Environment", {}))
    env.update(TRAINING_JOB_NAME=job_name, SM_MODEL_DIR=str(jobs.sandbox_path(sandbox, f"{CONTAINER_ROOT}/model")))
    command = [sys.executable, "-u", "-c", INVOKER, str(failure), *container_arguments]
    try:
        jobs.run_process(name, command, workspace, env, sandbox, entry, started)
    except StepFailed:
        if failure.is_file():   # what SageMaker reports as the job's FailureReason
            raise StepFailed(f"{name}: the function raised {failure.read_text(encoding='utf-8').strip()}; "
                             f"log: {sandbox / 'job.log'}") from None
        raise
    results = arguments["OutputDataConfig"]["S3OutputPath"]
    download_prefix(jobs.s3, results, sandbox / RESULTS)
    arn = jobs.record_job("CreateTrainingJob", name, job_name, arguments)
    entry["Metadata"]["TrainingJob"]["Arn"] = arn
    return {**arguments, "TrainingJobName": job_name, "TrainingJobArn": arn, "TrainingJobStatus": "Completed"}
