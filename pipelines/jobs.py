"""Jobs run the way SageMaker runs them, as processes of this machine with the container's ``/opt/ml`` in a sandbox.

- Processing: inputs staged from S3, the ``code`` bundle extracted and the entry script that
  the SDK's ``runproc.sh`` names run with the job's arguments; outputs uploaded at the end.
- Training: channels staged under ``input/data``, hyperparameters and ``SM_*`` variables set
  as SageMaker's container does, and the command built by the SDK's own driver script
  (``sm_drivers``, e.g. torchrun); ``/opt/ml/model`` uploaded as ``model.tar.gz``.

Outputs reach S3 only after a job succeeds, so a killed job leaves nothing half-written, and
are encrypted with the job's KMS key when it names one (``KmsKeyId``). VPC and network
isolation settings do not apply: jobs run as subprocesses of this machine.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

from botocore import xform_name
from botocore.exceptions import ClientError, ParamValidationError
from packaging.requirements import Requirement
from stepkit.archive import pack_folder
from stepkit.threads import usable_cpus

from .checkpoints import synced_checkpoints
from .expressions import format_value
from .failures import JOB_INTERNAL_ERROR, StepFailed
from .files import write_json_atomic
from .s3 import download_prefix, split_s3_uri, upload_folder

CONTAINER_ROOT = "/opt/ml"


def output_encryption(arguments: dict) -> dict | None:
    """The upload arguments that encrypt a job's outputs with its KMS key, as SageMaker does; None without one."""
    key = (arguments.get("ProcessingOutputConfig", {}).get("KmsKeyId")
           or arguments.get("OutputDataConfig", {}).get("KmsKeyId")
           or arguments.get("TransformOutput", {}).get("KmsKeyId"))
    return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": key} if key else None


def is_python(command: str) -> bool:
    """``python``, ``python3``, ``python3.12``, ``/usr/bin/python3``: the container's Python, which is ours here."""
    return re.fullmatch(r"python[0-9.]*", Path(command).name) is not None


def processing_problem(app: dict, input_names: set[str]) -> str | None:
    """Why a processing job cannot run here (its image's own entrypoint is not ours to run); None when it can."""
    entrypoint = [format_value(p) for p in app.get("ContainerEntrypoint") or []]
    if "code" in input_names and any(p.endswith(".sh") for p in entrypoint):
        return None   # FrameworkProcessor: runproc.sh runs the code bundle's script
    if "code" in input_names and entrypoint and is_python(entrypoint[0]):
        return None   # ScriptProcessor: python3 /opt/ml/processing/input/code/<script>
    return ("only FrameworkProcessor and ScriptProcessor jobs with a Python script (a code input) run locally; "
            f"this one runs its image's entrypoint {entrypoint or app.get('ImageUri')}")


def training_problem(arguments: dict) -> str | None:
    """Why a training job cannot run here; None when it can (a ModelTrainer job with source code)."""
    channels = {channel.get("ChannelName") for channel in arguments.get("InputDataConfig", [])}
    if {"sm_drivers", "code"} <= channels:
        return None
    return ("only ModelTrainer jobs with source code (sm_drivers + code channels) run locally; this one runs "
            f"its image's own training program ({arguments.get('AlgorithmSpecification', {}).get('TrainingImage')})")


def extract_archives(folder: Path) -> None:
    """What the container's bootstrap does with the code channel: unpack sourcedir.tar.gz in place."""
    for archive in sorted(folder.glob("*.tar.gz")):
        with tarfile.open(archive) as tar:
            tar.extractall(folder, filter="data")


def missing_requirements(requirements: Path) -> list[str]:
    """Requirements a job would pip-install in its container; here they must already be installed."""
    return unmet_requirements(requirements.read_text(encoding="utf-8").splitlines())


def unmet_requirements(lines: list[str]) -> list[str]:
    """The requirement specifiers (one a line, ``#`` comments) that this Python's packages do not meet."""
    missing = []
    for line in lines:
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


def requirements_refusal(name: str, what: str, missing: list[str]) -> StepFailed:
    """The one line that refuses a job whose container would pip-install what this Python lacks."""
    return StepFailed(f"{name}: {what} needs {', '.join(missing)}, which this Python does not have; the container "
                      "would pip-install them, the local executor does not change your environment: "
                      f"pip install {' '.join(shlex.quote(m.split(' (')[0]) for m in missing)}")


@dataclass
class JobRunner:
    """Runs jobs for the executor (several at once from its threads); ``session`` is a boto3 Session on the target AWS."""

    session: Any
    echo: Callable[[str], None] = print
    job_env: dict[str, str] = field(default_factory=dict)
    labelled: bool = False   # prefix each echoed line of a job's output with its step's name

    def __post_init__(self) -> None:
        self.s3 = self.session.client("s3")
        self.lock = threading.Lock()
        self.running: dict[int, str] = {}   # each running job's process group → its FLANOPS_JOB_NAME marker
        self.stopped: str | None = None     # why no job may start any more (the execution is stopping)

    def stop_all(self, reason: str, force: bool = False) -> None:
        """Stop every running job (its whole process group: SIGTERM, or SIGKILL with ``force``) and start no more."""
        with self.lock:
            self.stopped = reason
            running = dict(self.running)
        for pid, marker in running.items():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL if force else signal.SIGTERM)
            if force:
                kill_job_processes(marker)

    def sandbox_path(self, sandbox: Path, container_path: str) -> Path:
        return sandbox / container_path.lstrip("/")

    def map_argument(self, sandbox: Path, value: Any) -> str:
        """Container paths in an argument (``/opt/ml/...`` or ``name=/opt/ml/...``) → the sandbox."""
        return re.sub(rf"(^|=){re.escape(CONTAINER_ROOT)}/", lambda m: f"{m.group(1)}{sandbox}{CONTAINER_ROOT}/",
                      format_value(value))

    def fresh_sandbox(self, sandbox: Path) -> None:
        if sandbox.exists():
            shutil.rmtree(sandbox)   # our scratch space for this job, from an earlier failed attempt
        sandbox.mkdir(parents=True)

    def run_processing(self, name, job_name, arguments, sandbox, entry, started: Callable[[], None]) -> dict:
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
        code_dir, command = self.processing_command(name, app, local_inputs, sandbox)
        argv = command + [self.map_argument(sandbox, a) for a in app.get("ContainerArguments", [])]
        env = self.container_env(sandbox, job_name, arguments.get("Environment", {}))
        self.run_process(name, argv, code_dir, env, sandbox, entry, started)
        for item in outputs:
            upload_folder(self.s3, self.sandbox_path(sandbox, item["S3Output"]["LocalPath"]), item["S3Output"]["S3Uri"],
                          output_encryption(arguments))
        entry["Metadata"]["ProcessingJob"] = {"Arn": self.job_arn("processing-job", job_name)}
        return {**arguments, "ProcessingJobName": job_name, "ProcessingJobStatus": "Completed",
                "ProcessingJobArn": self.job_arn("processing-job", job_name)}

    def processing_command(self, name: str, app: dict, inputs: dict[str, Path],
                           sandbox: Path) -> tuple[Path, list[str]]:
        """FrameworkProcessor: do what the SDK's runproc.sh does (unpack the code, check requirements, run the
        script). ScriptProcessor: run its entrypoint (``python3 /opt/ml/processing/input/code/x.py``) here."""
        problem = processing_problem(app, set(inputs))
        if problem:
            raise StepFailed(f"{name}: {problem}")
        entrypoint = [format_value(p) for p in app.get("ContainerEntrypoint") or []]
        script = next((Path(p) for p in entrypoint if p.endswith(".sh")), None)
        code_dir = inputs["code"]
        if script is None:   # ScriptProcessor
            command = [self.map_argument(sandbox, part) for part in entrypoint]
            return code_dir, [sys.executable, "-u", *command[1:]] if is_python(command[0]) else command
        runproc = next((p for p in inputs.values() if (p / script.name).is_file()), None)
        if runproc is None:
            raise StepFailed(f"{name}: {script.name} was not among the staged inputs")
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
                raise requirements_refusal(name, "the job's requirements.txt", missing)

    def run_training(self, name, job_name, arguments, sandbox, entry, started: Callable[[], None]) -> dict:
        self.fresh_sandbox(sandbox)
        data_root = self.sandbox_path(sandbox, f"{CONTAINER_ROOT}/input/data")
        channels = {}
        for channel in arguments.get("InputDataConfig", []):
            folder = data_root / channel["ChannelName"]
            download_prefix(self.s3, channel["DataSource"]["S3DataSource"]["S3Uri"], folder)
            channels[channel["ChannelName"]] = folder
        problem = training_problem(arguments)
        if problem:
            raise StepFailed(f"{name}: {problem}")
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
        with synced_checkpoints(self.s3, arguments.get("CheckpointConfig"), lambda path: self.sandbox_path(sandbox, path),
                                output_encryption(arguments), self.echo):
            self.run_process(name, command, code_dir, env, sandbox, entry, started)
        output_path = arguments["OutputDataConfig"]["S3OutputPath"].rstrip("/")
        artifact = sandbox / "model.tar.gz"
        pack_folder(model_dir, artifact)   # /opt/ml/model as is, as SageMaker tars it: reproducible bytes
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
        if command and is_python(command[0]):
            command[0] = sys.executable
        return command

    def container_env(self, sandbox: Path, job_name: str, extra: dict) -> dict[str, str]:
        env = {**os.environ, **self.job_env, **{k: format_value(v) for k, v in extra.items()}}
        # The container's Python is this one; torchrun and friends live beside it.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.update(PYTHONUNBUFFERED="1", SM_NUM_CPUS=str(usable_cpus()), FLANOPS_JOB_NAME=job_name)
        env.pop("PYTHONPATH", None)
        return env

    def run_process(self, name, argv, cwd, env, sandbox, entry, started: Callable[[], None]) -> None:
        """Run one job's command, streaming its output; when it ends, none of its processes outlive it.
        ``started`` is told once the process exists (its pid is in ``entry``)."""
        log_path = sandbox / "job.log"
        env = {**env}
        env.setdefault("FLANOPS_JOB_NAME", f"{name}-{os.getpid()}-{time.time_ns()}")   # marks every process of the job
        tail: list[str] = []
        label = f"[{name}] " if self.labelled else ""   # jobs running side by side: whose line this is
        with open(log_path, "w", encoding="utf-8", buffering=1) as log:   # line-buffered: readable while it runs
            with self.lock:   # a stop either sees this job among the running ones or keeps it from starting
                if self.stopped:
                    raise StepFailed(f"{name}: {self.stopped} before its job started")
                process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           text=True, bufsize=1, start_new_session=True)
                self.running[process.pid] = env["FLANOPS_JOB_NAME"]
            entry["Metadata"].update(Pid=process.pid, Command=argv)
            started()

            def relay() -> None:
                for line in process.stdout:
                    log.write(line)
                    self.echo(f"{label}    │ {line.rstrip()}")
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
                with self.lock:
                    self.running.pop(process.pid, None)
        if code != 0:
            reason = next((line for line in reversed(tail) if "error:" in line.lower()), None)
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            # Killed by a signal (the OOM killer's SIGKILL, a crash; 137 is SIGKILL through a shell) is what SageMaker
            # calls an internal error of the job: worth a retry. A script's own error exit is not.
            raise StepFailed(f"{name}: the job failed ({how})" + (f": {reason}" if reason else "")
                             + f"; log: {log_path}", JOB_INTERNAL_ERROR if code < 0 or code == 137 else None)

    def job_arn(self, kind: str, job_name: str) -> str:
        region = self.session.region_name
        account = self.account()
        return f"arn:aws:sagemaker:{region}:{account}:{kind}/{job_name.lower()}"

    def record_job(self, operation: str, name: str, job_name: str, arguments: dict) -> str:
        """The finished job created in the target's SageMaker with its own request (``operation``: CreateTrainingJob,
        CreateTransformJob), so that Describe*Job and the SDK's readers find it; returns its ARN."""
        sagemaker = self.session.client("sagemaker")
        operation_model = sagemaker.meta.service_model.operation_model(operation)
        name_member = operation.removeprefix("Create") + "Name"   # TrainingJobName, TransformJobName
        request = {key: value for key, value in arguments.items()
                   if key in operation_model.input_shape.members and value not in ({}, None, [])}
        try:
            created = getattr(sagemaker, xform_name(operation))(**{**request, name_member: job_name})
        except (ClientError, ParamValidationError) as err:
            raise StepFailed(f"{name}: the job ran, but recording it in SageMaker ({operation}) failed: {err}") from None
        return created[name_member.replace("Name", "Arn")]

    def account(self) -> str:
        if not hasattr(self, "_account"):
            self._account = self.session.client("sts").get_caller_identity()["Account"]
        return self._account


def kill_job_processes(job_name: str) -> int:
    """SIGKILL every process whose environment names this job (Linux /proc; elsewhere a no-op)."""
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

