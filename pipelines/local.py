"""Run a SageMaker pipeline definition on this machine, against embedded (or any) S3 and SageMaker APIs.

The executor keeps no list of steps of its own: it reads the definition JSON, resolves
parameters, ``Get``, ``Std:Join``, ``Std:JsonGet`` and conditions, and runs each job the way
SageMaker would run it, with the container's ``/opt/ml`` mapped into a per-job sandbox:

- Processing: inputs staged from S3, the ``code`` bundle extracted and the entry script that
  the SDK's ``runproc.sh`` names run with the job's arguments; outputs uploaded at the end.
- Training: channels staged under ``input/data``, hyperparameters and ``SM_*`` variables set
  as SageMaker's container does, and the command built by the SDK's own driver script
  (``sm_drivers``, e.g. torchrun); ``/opt/ml/model`` uploaded as ``model.tar.gz``.
- Condition, Fail and RegisterModel steps run too (the model package lands in the registry).

Outputs reach S3 only after a job succeeds, so a killed job leaves nothing half-written, and
are encrypted with the job's KMS key when it names one (``KmsKeyId``). VPC and network
isolation settings do not apply: jobs run as subprocesses of this machine.
Steps with caching enabled reuse an earlier run's outputs when their resolved arguments
(code locations are content-addressed) are unchanged. Jobs run one at a time: branches that
SageMaker runs in parallel run in definition order here (each job uses every core anyway).
The expressions are evaluated by expressions.py; each execution's record is kept by records.py.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

from stepkit.threads import usable_cpus

from .expressions import Context, evaluate_condition, format_value, references, walk_path
from .failures import AwsUnreachable, StepFailed, known_failure
from .files import write_json_atomic
from .records import records_dir, utcnow
from .s3 import download_prefix, prefix_exists, split_s3_uri, upload_folder

CONTAINER_ROOT = "/opt/ml"
PLACEHOLDER_EXECUTION = "<execution-id>"   # stands in for the execution id in cache keys
JOB_TYPES = ("Processing", "Training")


# ----------------------------------------------------------------------------- S3 staging
def output_encryption(arguments: dict) -> dict | None:
    """The upload arguments that encrypt a job's outputs with its KMS key, as SageMaker does; None without one."""
    key = (arguments.get("ProcessingOutputConfig", {}).get("KmsKeyId")
           or arguments.get("OutputDataConfig", {}).get("KmsKeyId"))
    return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": key} if key else None


def extract_archives(folder: Path) -> None:
    """What the container's bootstrap does with the code channel: unpack sourcedir.tar.gz in place."""
    for archive in sorted(folder.glob("*.tar.gz")):
        with tarfile.open(archive) as tar:
            tar.extractall(folder, filter="data")


def missing_requirements(requirements: Path) -> list[str]:
    """Requirements a job would pip-install in its container; here they must already be installed."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    missing = []
    for line in requirements.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            missing.append(line)
            continue
        if requirement.specifier and not requirement.specifier.contains(installed, prereleases=True):
            missing.append(f"{line} (installed: {installed})")
    return missing


def parse_duration(text: str) -> timedelta:
    """ISO 8601 durations as CacheConfig's ExpireAfter uses them (P30D, PT12H, P1W)."""
    match = re.fullmatch(r"P(?:(\d+)W)?(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?", text or "")
    if not match:
        return timedelta(days=30)
    weeks, days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return timedelta(weeks=weeks, days=days, hours=hours, minutes=minutes, seconds=seconds)


# ----------------------------------------------------------------------------- the step graph
@dataclass
class StepGraph:
    """A definition's steps (condition branches included) and what each waits for."""

    steps: dict[str, dict]
    branch_of: dict[str, tuple[str, bool]]   # step in a condition's branch → (condition, True for IfSteps)

    @classmethod
    def of(cls, definition: dict) -> "StepGraph":
        steps, branch_of = {}, {}
        for step in definition["Steps"]:
            steps[step["Name"]] = step
            if step["Type"] == "Condition":
                for branch, chosen in (("IfSteps", True), ("ElseSteps", False)):
                    for child in step["Arguments"].get(branch, []):
                        steps[child["Name"]] = child
                        branch_of[child["Name"]] = (step["Name"], chosen)
        return cls(steps, branch_of)

    def dependencies(self, name: str) -> set[str]:
        step = self.steps[name]
        found = set(step.get("DependsOn", [])) | references(step.get("Arguments", {}))
        if step["Type"] == "Condition":
            found = set(step.get("DependsOn", [])) | references(step["Arguments"].get("Conditions", []))
        if name in self.branch_of:
            found.add(self.branch_of[name][0])
        return found - {name}

    def order(self) -> list[str]:
        order, placed = [], set()
        names = list(self.steps)
        while len(order) < len(names):
            ready = [n for n in names if n not in placed and self.dependencies(n) <= placed]
            if not ready:
                raise StepFailed(f"the definition's steps depend on each other in a cycle or on unknown steps: "
                                 f"{sorted(set(names) - placed)}")
            order.append(ready[0])
            placed.add(ready[0])
        return order


# ----------------------------------------------------------------------------- the executor
@dataclass
class LocalExecutor:
    """Executes one pipeline's definition; ``session`` is a boto3 Session on the target AWS."""

    session: Any
    pipeline_name: str
    definition: dict
    home: Path
    run_dir: Path
    echo: Callable[[str], None] = print
    job_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.s3 = self.session.client("s3")
        self.sagemaker = self.session.client("sagemaker")
        self.graph = StepGraph.of(self.definition)
        self.steps = self.graph.steps
        self.branch_of = self.graph.branch_of

    # -- executions
    def start(self, parameters: dict[str, Any], execution_arn: str) -> dict:
        execution_id = execution_arn.rsplit("/", 1)[-1]
        defaults = {p["Name"]: p.get("DefaultValue") for p in self.definition.get("Parameters", [])}
        unknown = set(parameters) - set(defaults)
        if unknown:
            raise StepFailed(f"unknown pipeline parameter(s) {sorted(unknown)}; the definition has {sorted(defaults)}")
        record = {
            "PipelineName": self.pipeline_name, "PipelineExecutionArn": execution_arn, "ExecutionId": execution_id,
            "PipelineExecutionStatus": "Executing", "CreationTime": utcnow(), "LastModifiedTime": utcnow(),
            "FailureReason": None, "Parameters": {**defaults, **parameters}, "RunDir": str(self.run_dir),
            "ExecutorPid": os.getpid(), "Steps": [], "Properties": {}, "PropertyFiles": {},
        }
        write_json_atomic(self.run_dir / "definition.json", self.definition)
        return self.execute(record)

    def resume(self, record: dict) -> dict:
        """Rerun the failed step and everything after it; succeeded steps keep their outputs."""
        succeeded = {s["StepName"] for s in record["Steps"] if s["StepStatus"] == "Succeeded"}
        record["Steps"] = [s for s in record["Steps"] if s["StepName"] in succeeded]
        record["Properties"] = {k: v for k, v in record["Properties"].items() if k in succeeded}
        record["PropertyFiles"] = {k: v for k, v in record["PropertyFiles"].items() if k.split(".")[0] in succeeded}
        record.update(PipelineExecutionStatus="Executing", FailureReason=None, Resumable=True,
                      ExecutorPid=os.getpid(), LastModifiedTime=utcnow())
        return self.execute(record)

    def execute(self, record: dict) -> dict:
        ctx = Context(record["ExecutionId"], record["PipelineExecutionArn"], self.pipeline_name,
                      record["Parameters"], record["Properties"], record["PropertyFiles"])
        done = {s["StepName"] for s in record["Steps"] if s["StepStatus"] == "Succeeded"}
        decisions = {s["StepName"]: s["Metadata"].get("Condition", {}).get("Outcome") == "True"
                     for s in record["Steps"] if s["StepType"] == "Condition" and s["StepName"] in done}
        self.save(record)
        try:
            for name in self.graph.order():
                if name in done:
                    continue
                if name in self.branch_of:
                    condition, branch = self.branch_of[name]
                    if decisions.get(condition) != branch:
                        continue   # the other branch was taken: SageMaker does not list this step
                self.run_step(name, ctx, record, decisions)
            record["PipelineExecutionStatus"] = "Succeeded"
        except StepFailed as failure:
            record["PipelineExecutionStatus"] = "Failed"
            record["FailureReason"] = str(failure)
            record["Resumable"] = not isinstance(failure, AwsUnreachable)
        except KeyboardInterrupt:
            record["PipelineExecutionStatus"] = "Stopped"
            record["FailureReason"] = "interrupted (Ctrl-C); `flanops run --resume` continues it"
            for step in record["Steps"]:
                if step["StepStatus"] in ("Starting", "Executing"):
                    step.update(StepStatus="Stopped", EndTime=utcnow(), FailureReason="interrupted")
            self.save(record)
            raise
        record["LastModifiedTime"] = utcnow()
        self.save(record)
        return record

    def save(self, record: dict) -> None:
        write_json_atomic(records_dir(self.home, self.pipeline_name) / f"{record['ExecutionId']}.json", record)

    def run_step(self, name: str, ctx: Context, record: dict, decisions: dict[str, bool]) -> None:
        step = self.steps[name]
        entry = {"StepName": name, "StepType": step["Type"], "StepStatus": "Executing", "StartTime": utcnow(),
                 "EndTime": None, "Metadata": {}, "CacheHitResult": None, "FailureReason": None}
        record["Steps"].append(entry)
        self.save(record)
        started = time.perf_counter()
        self.echo(f"==> {name} ({step['Type']})")
        try:
            if step["Type"] in JOB_TYPES:
                self.run_job(step, ctx, record, entry)
            elif step["Type"] == "Condition":
                outcome = all(evaluate_condition(c, ctx, name) for c in step["Arguments"]["Conditions"])
                decisions[name] = outcome
                entry["Metadata"]["Condition"] = {"Outcome": str(outcome)}
                self.echo(f"    conditions {'met' if outcome else 'not met'}: "
                          f"{'IfSteps' if outcome else 'ElseSteps'} run")
            elif step["Type"] == "Fail":
                message = format_value(ctx.resolve(step["Arguments"].get("ErrorMessage", ""), name))
                entry["Metadata"]["Fail"] = {"ErrorMessage": message}
                raise StepFailed(message)
            elif step["Type"] == "RegisterModel":
                arn = self.register(ctx.resolve(step["Arguments"], name))
                ctx.properties[name] = {"ModelPackageArn": arn}
                entry["Metadata"]["RegisterModel"] = {"Arn": arn}
                self.echo(f"    registered {arn}")
            else:
                raise StepFailed(f"{name}: step type {step['Type']} is not supported by the local executor")
        except Exception as error:
            failure = error if isinstance(error, StepFailed) else known_failure(
                name, error, self.job_env.get("AWS_ENDPOINT_URL"), self.run_dir)
            if failure is None:
                raise
            entry.update(StepStatus="Failed", FailureReason=str(failure), EndTime=utcnow(),
                         DurationSeconds=round(time.perf_counter() - started, 1))
            self.save(record)
            raise failure from None
        entry.update(StepStatus="Succeeded", EndTime=utcnow(), DurationSeconds=round(time.perf_counter() - started, 1))
        self.save(record)

    # -- jobs
    def cache_path(self, name: str, key: str) -> Path:
        return self.home / "cache" / self.pipeline_name / name / f"{key}.json"

    def run_job(self, step: dict, ctx: Context, record: dict, entry: dict) -> None:
        name = step["Name"]
        key_ctx = Context(PLACEHOLDER_EXECUTION, PLACEHOLDER_EXECUTION, ctx.pipeline_name, ctx.parameters,
                          ctx.properties, ctx.property_files)
        key_source = {"Type": step["Type"], "Arguments": key_ctx.resolve(step["Arguments"], name),
                      "PropertyFiles": step.get("PropertyFiles", [])}
        key = hashlib.sha256(json.dumps(key_source, sort_keys=True, default=str).encode()).hexdigest()
        cache = step.get("CacheConfig", {})
        if cache.get("Enabled") and self.reuse(name, key, cache, ctx, entry):
            return
        arguments = ctx.resolve(step["Arguments"], name)
        job_name = f"{self.pipeline_name}-{name}-{ctx.execution_id}"[:63].rstrip("-")
        sandbox = self.run_dir / "jobs" / name
        if step["Type"] == "Processing":
            properties = self.run_processing(name, job_name, arguments, sandbox, entry, record)
        else:
            properties = self.run_training(name, job_name, arguments, sandbox, entry, record)
        ctx.properties[name] = properties
        files = {}
        for spec in step.get("PropertyFiles", []):
            output = walk_path(arguments, f"ProcessingOutputConfig.Outputs['{spec['OutputName']}']", name)
            path = sandbox / output["S3Output"]["LocalPath"].lstrip("/") / spec["FilePath"]
            try:
                files[spec["PropertyFileName"]] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as err:
                raise StepFailed(f"{name}: property file {spec['FilePath']} unreadable ({err})") from None
        for file_name, document in files.items():
            ctx.property_files[f"{name}.{file_name}"] = document
        write_json_atomic(self.cache_path(name, key), {
            "CreationTime": utcnow(), "SourcePipelineExecutionArn": ctx.execution_arn,
            "Properties": properties, "PropertyFiles": files, "LocalCopies": local_copies(properties, sandbox)})

    def reuse(self, name: str, key: str, cache: dict, ctx: Context, entry: dict) -> bool:
        path = self.cache_path(name, key)
        if not path.is_file():
            return False
        hit = json.loads(path.read_text(encoding="utf-8"))
        age = datetime.now(timezone.utc) - datetime.fromisoformat(hit["CreationTime"])
        if age > parse_duration(cache.get("ExpireAfter", "")):
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
        self.echo(f"    cache hit: reusing the outputs of {hit['SourcePipelineExecutionArn'].rsplit('/', 1)[-1]}")
        return True

    def sandbox_path(self, sandbox: Path, container_path: str) -> Path:
        return sandbox / container_path.lstrip("/")

    def map_argument(self, sandbox: Path, value: Any) -> str:
        """Container paths in an argument (``/opt/ml/...`` or ``name=/opt/ml/...``) → the sandbox."""
        return re.sub(rf"(^|=){re.escape(CONTAINER_ROOT)}/", lambda m: f"{m.group(1)}{sandbox}{CONTAINER_ROOT}/",
                      format_value(value))

    def fresh_sandbox(self, sandbox: Path) -> None:
        import shutil

        if sandbox.exists():
            shutil.rmtree(sandbox)   # our scratch space for this job, from an earlier failed attempt
        sandbox.mkdir(parents=True)

    def run_processing(self, name, job_name, arguments, sandbox, entry, record) -> dict:
        self.fresh_sandbox(sandbox)
        local_inputs = {}
        for item in arguments.get("ProcessingInputs", []):
            local = self.sandbox_path(sandbox, item["S3Input"]["LocalPath"])
            download_prefix(self.s3, item["S3Input"]["S3Uri"], local)
            local_inputs[item["InputName"]] = local
        outputs = arguments.get("ProcessingOutputConfig", {}).get("Outputs", [])
        for item in outputs:
            self.sandbox_path(sandbox, item["S3Output"]["LocalPath"]).mkdir(parents=True, exist_ok=True)
        app = arguments["AppSpecification"]
        code_dir, command = self.processing_command(name, app, local_inputs)
        argv = command + [self.map_argument(sandbox, a) for a in app.get("ContainerArguments", [])]
        env = self.container_env(sandbox, job_name, arguments.get("Environment", {}))
        self.run_process(name, argv, code_dir, env, sandbox, entry, record)
        for item in outputs:
            upload_folder(self.s3, self.sandbox_path(sandbox, item["S3Output"]["LocalPath"]), item["S3Output"]["S3Uri"],
                          output_encryption(arguments))
        entry["Metadata"]["ProcessingJob"] = {"Arn": self.job_arn("processing-job", job_name)}
        return {**arguments, "ProcessingJobName": job_name, "ProcessingJobStatus": "Completed",
                "ProcessingJobArn": self.job_arn("processing-job", job_name)}

    def processing_command(self, name: str, app: dict, inputs: dict[str, Path]) -> tuple[Path, list[str]]:
        """Do what the SDK's runproc.sh does: unpack the code, check requirements, run the script."""
        entrypoint = app.get("ContainerEntrypoint") or []
        script = next((Path(p) for p in entrypoint if p.endswith(".sh")), None)
        if script is None or "code" not in inputs:
            raise StepFailed(f"{name}: only FrameworkProcessor jobs (runproc.sh + code input) run locally")
        runproc = next((p for p in inputs.values() if (p / script.name).is_file()), None)
        if runproc is None:
            raise StepFailed(f"{name}: {script.name} was not among the staged inputs")
        code_dir = inputs["code"]
        extract_archives(code_dir)
        lines = [line.strip() for line in (runproc / script.name).read_text(encoding="utf-8").splitlines()]
        run_line = next((line for line in reversed(lines) if '"$@"' in line), None)
        if run_line is None:
            raise StepFailed(f"{name}: {script.name} has no command line to run")
        command = shlex.split(run_line.replace('"$@"', ""))
        self.check_requirements(name, code_dir)
        return code_dir, [sys.executable, "-u", *command[1:]]

    def check_requirements(self, name: str, code_dir: Path) -> None:
        requirements = code_dir / "requirements.txt"
        if requirements.is_file():
            missing = missing_requirements(requirements)
            if missing:
                raise StepFailed(f"{name}: the job's requirements.txt needs {', '.join(missing)}, which this "
                                 "Python does not have; the container would pip-install them, the local executor "
                                 f"does not change your environment: pip install {' '.join(shlex.quote(m.split(' (')[0]) for m in missing)}")

    def run_training(self, name, job_name, arguments, sandbox, entry, record) -> dict:
        self.fresh_sandbox(sandbox)
        data_root = self.sandbox_path(sandbox, f"{CONTAINER_ROOT}/input/data")
        channels = {}
        for channel in arguments.get("InputDataConfig", []):
            folder = data_root / channel["ChannelName"]
            download_prefix(self.s3, channel["DataSource"]["S3DataSource"]["S3Uri"], folder)
            channels[channel["ChannelName"]] = folder
        if "sm_drivers" not in channels or "code" not in channels:
            raise StepFailed(f"{name}: only ModelTrainer jobs with source code (sm_drivers + code channels) run locally")
        model_dir = self.sandbox_path(sandbox, f"{CONTAINER_ROOT}/model")
        output_data = self.sandbox_path(sandbox, f"{CONTAINER_ROOT}/output/data")
        config_dir = self.sandbox_path(sandbox, f"{CONTAINER_ROOT}/input/config")
        for folder in (model_dir, output_data, config_dir):
            folder.mkdir(parents=True, exist_ok=True)
        # container paths in hyperparameters (--checkpoint-dir /opt/ml/checkpoints) → the sandbox, as for processing
        hyperparameters = {k: self.map_argument(sandbox, v) for k, v in arguments.get("HyperParameters", {}).items()}
        resources = arguments.get("ResourceConfig", {})
        instances = int(resources.get("InstanceCount", 1))
        if instances > 1:
            self.echo(f"    {instances} instances requested: the local executor runs one (SageMaker runs torchrun "
                      "across all of them)")
        write_json_atomic(config_dir / "hyperparameters.json", hyperparameters)
        write_json_atomic(config_dir / "resourceconfig.json", {"current_host": "algo-1", "hosts": ["algo-1"]})
        drivers = channels["sm_drivers"]
        source_code = json.loads((drivers / "sourcecode.json").read_text(encoding="utf-8"))
        distributed_file = drivers / "distributed.json"
        distributed = json.loads(distributed_file.read_text(encoding="utf-8")) if distributed_file.is_file() else {}
        code_dir = channels["code"]
        extract_archives(code_dir)
        if source_code.get("requirements"):
            self.check_requirements(name, code_dir)
        env = self.container_env(sandbox, job_name, arguments.get("Environment", {}))
        env.update({
            "SM_MODEL_DIR": str(model_dir), "SM_OUTPUT_DATA_DIR": str(output_data),
            "SM_INPUT_DIR": str(data_root.parent), "SM_INPUT_DATA_DIR": str(data_root),
            "SM_INPUT_CONFIG_DIR": str(config_dir), "SM_OUTPUT_DIR": str(output_data.parent),
            "SM_CHANNELS": json.dumps(sorted(channels)), "SM_HPS": json.dumps(hyperparameters),
            "SM_ENTRY_SCRIPT": source_code.get("entry_script") or "", "SM_SOURCE_DIR": str(code_dir),
            "SM_DISTRIBUTED_CONFIG": json.dumps(distributed), "SM_HOSTS": json.dumps(["algo-1"]),
            "SM_CURRENT_HOST": "algo-1", "SM_CURRENT_HOST_RANK": "0", "SM_HOST_COUNT": "1",
            "SM_MASTER_ADDR": "127.0.0.1", "SM_MASTER_PORT": "7777", "SM_NUM_GPUS": "0", "SM_NUM_NEURONS": "0",
            "SM_CURRENT_INSTANCE_TYPE": str(resources.get("InstanceType", "")), "TRAINING_JOB_NAME": job_name,
        })
        env.update({f"SM_CHANNEL_{c.upper()}": str(folder) for c, folder in channels.items()})
        command = self.driver_command(name, drivers, env)
        from .checkpoints import synced_checkpoints

        with synced_checkpoints(self.s3, arguments.get("CheckpointConfig"), lambda path: self.sandbox_path(sandbox, path),
                                output_encryption(arguments), self.echo):
            self.run_process(name, command, code_dir, env, sandbox, entry, record)
        output_path = arguments["OutputDataConfig"]["S3OutputPath"].rstrip("/")
        artifact = sandbox / "model.tar.gz"
        from stepkit.archive import pack_folder   # /opt/ml/model as is, as SageMaker tars it: reproducible bytes

        pack_folder(model_dir, artifact)
        bucket, key = split_s3_uri(f"{output_path}/{job_name}/output/model.tar.gz")
        self.s3.upload_file(str(artifact), bucket, key, ExtraArgs=output_encryption(arguments))
        arn = self.job_arn("training-job", job_name)
        entry["Metadata"]["TrainingJob"] = {"Arn": arn}
        return {**arguments, "TrainingJobName": job_name, "TrainingJobArn": arn, "TrainingJobStatus": "Completed",
                "ModelArtifacts": {"S3ModelArtifacts": f"s3://{bucket}/{key}"}}

    def driver_command(self, name: str, drivers: Path, env: dict[str, str]) -> list[str]:
        """The command the SDK's driver (named in sm_train.sh) would execute, built by that driver."""
        train_script = (drivers / "sm_train.sh").read_text(encoding="utf-8")
        match = re.search(r"sm_drivers/(distributed_drivers/\w+\.py)", train_script)
        if not match:
            raise StepFailed(f"{name}: sm_train.sh names no driver script the local executor knows")
        driver = drivers / match.group(1)
        probe = ("import importlib.util, json, sys\n"
                 f"spec = importlib.util.spec_from_file_location('driver', {str(driver)!r})\n"
                 "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
                 "print(json.dumps(module.create_commands()))\n")
        result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise StepFailed(f"{name}: the SDK driver {driver.name} could not build the command: "
                             f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}")
        command = json.loads(result.stdout.strip().splitlines()[-1])
        if command and command[0] in ("python", "python3"):
            command[0] = sys.executable
        return command

    def container_env(self, sandbox: Path, job_name: str, extra: dict) -> dict[str, str]:
        env = {**os.environ, **self.job_env, **{k: format_value(v) for k, v in extra.items()}}
        # The container's Python is this one; torchrun and friends live beside it.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.update(PYTHONUNBUFFERED="1", SM_NUM_CPUS=str(usable_cpus()), FLANOPS_JOB_NAME=job_name)
        env.pop("PYTHONPATH", None)
        return env

    def run_process(self, name, argv, cwd, env, sandbox, entry, record) -> None:
        """Run one job's command, streaming its output; when it ends, none of its processes outlive it."""
        import signal
        import threading

        log_path = sandbox / "job.log"
        env = {**env}
        env.setdefault("FLANOPS_JOB_NAME", f"{name}-{os.getpid()}-{time.time_ns()}")   # marks every process of the job
        tail: list[str] = []
        with open(log_path, "w", encoding="utf-8", buffering=1) as log:   # line-buffered: readable while it runs
            process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, bufsize=1, start_new_session=True)
            entry["Metadata"].update(Pid=process.pid, Command=argv)
            self.save(record)

            def relay() -> None:
                for line in process.stdout:
                    log.write(line)
                    self.echo(f"    │ {line.rstrip()}")
                    tail[:] = (tail + [line.rstrip()])[-20:]

            reader = threading.Thread(target=relay, daemon=True)
            reader.start()
            try:
                code = process.wait()
            except KeyboardInterrupt:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
                process.wait()
                raise
            finally:
                # Launchers such as torchrun start workers in sessions of their own: if the launcher
                # dies they would keep running and keep our pipe open. They carry the job's name.
                kill_job_processes(env["FLANOPS_JOB_NAME"])
                reader.join(timeout=10)
        if code != 0:
            reason = next((line for line in reversed(tail) if "error:" in line.lower()), None)
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            raise StepFailed(f"{name}: the job failed ({how})" + (f": {reason}" if reason else "")
                             + f"; log: {log_path}")

    def job_arn(self, kind: str, job_name: str) -> str:
        region = self.session.region_name
        account = self.account()
        return f"arn:aws:sagemaker:{region}:{account}:{kind}/{job_name.lower()}"

    def account(self) -> str:
        if not hasattr(self, "_account"):
            self._account = self.session.client("sts").get_caller_identity()["Account"]
        return self._account

    def register(self, arguments: dict) -> str:
        group = arguments["ModelPackageGroupName"]
        from botocore.exceptions import ClientError

        try:
            self.sagemaker.describe_model_package_group(ModelPackageGroupName=group)
        except ClientError:
            self.sagemaker.create_model_package_group(
                ModelPackageGroupName=group, ModelPackageGroupDescription=f"created by {self.pipeline_name}")
        request = {k: v for k, v in arguments.items() if v not in ({}, None)}
        metrics = request.get("ModelMetrics")
        if metrics:
            request["ModelMetrics"] = {k: v for k, v in metrics.items() if v}
        try:
            return self.sagemaker.create_model_package(**request)["ModelPackageArn"]
        except ClientError as err:
            raise StepFailed(f"RegisterModel: {err}") from None


def kill_job_processes(job_name: str) -> int:
    """SIGKILL every process whose environment names this job (Linux /proc; elsewhere a no-op)."""
    import signal

    marker = f"FLANOPS_JOB_NAME={job_name}\0".encode()
    killed = 0
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        try:
            if b"\0" + marker in b"\0" + (entry / "environ").read_bytes() + b"\0":
                os.kill(pid, signal.SIGKILL)
                killed += 1
        except (OSError, ValueError):
            continue   # gone already, or not ours to read
    return killed


def local_copies(properties: dict, sandbox: Path) -> dict[str, dict]:
    """Each output's S3 location → the job's own copy of it in the run folder, with each file's size."""
    copies = {item["S3Output"]["S3Uri"]: sandbox / item["S3Output"]["LocalPath"].lstrip("/")
              for item in properties.get("ProcessingOutputConfig", {}).get("Outputs", [])}
    artifact = properties.get("ModelArtifacts", {}).get("S3ModelArtifacts")
    if artifact:
        copies[artifact] = sandbox / "model.tar.gz"
    return {uri: {"path": str(path), "files": file_sizes(path)} for uri, path in copies.items() if path.exists()}


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
    uris = [item["S3Output"]["S3Uri"] for item in properties.get("ProcessingOutputConfig", {}).get("Outputs", [])]
    artifact = properties.get("ModelArtifacts", {}).get("S3ModelArtifacts")
    return uris + ([artifact] if artifact else [])
