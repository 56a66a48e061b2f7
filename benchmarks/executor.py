"""The local executor's own overhead: the PrepareData job through LocalExecutor vs the same script by hand.

The executor side runs the real definition's PrepareData step (built by the SageMaker SDK for
a pipeline named ``flanops-bench``, caching off) on embedded AWS: code staged from S3 and
unpacked, the container contract's sandbox, the job as a subprocess, outputs uploaded to S3,
the execution record written. The by-hand side runs ``python steps/prepare_data.py`` with the
very arguments the definition gives the job (output folder mapped to a local one). Both are
subprocesses doing the same work, interleaved; the difference is what the executor adds.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import uuid

from .harness import BenchSettings, Progress, SectionResult, interleaved, quantity, ratio, spread
from .subjects import Workspace

TITLE = "Local executor overhead"
PIPELINE = "flanops-bench"
CONTAINER_OUTPUT = "/opt/ml/processing/output/data"


def run(settings: BenchSettings, workspace: Workspace, progress: Progress) -> SectionResult:
    from flanops.pipelines.pipeline_commands import definition_for
    from flanops.pipelines.targets import TargetChoice, open_target
    from flanops.pipelines.config import load_config
    from flanops.pipelines.step_scripts import steps_dir
    from flanops.pipelines.definition import NAMES
    from flanops.pipelines.home import flanops_home
    from flanops.pipelines.expressions import Context, format_value
    from flanops.pipelines.local import LocalExecutor

    label = "executor PrepareData"
    config = load_config(None, {"pipeline_name": PIPELINE, "steps.prepare.train_size": settings.executor_train_size,
                                "steps.prepare.validation_size": max(1, settings.executor_train_size // 10),
                                "steps.prepare.test_size": max(1, settings.executor_train_size // 10)})
    progress(f"{label}: embedded AWS and the pipeline definition (SageMaker SDK)")
    started = time.perf_counter()
    target = open_target(TargetChoice())
    definition = json.loads(definition_for(config, target))
    build_seconds = time.perf_counter() - started
    step = next(s for s in definition["Steps"] if s["Name"] == NAMES.prepare)
    step = {**step, "CacheConfig": {"Enabled": False}}   # every repetition runs the job
    alone = {**definition, "Steps": [step]}
    parameters = config.parameter_values()
    container_args = Context("bench", "bench", PIPELINE, parameters).resolve(
        step["Arguments"]["AppSpecification"]["ContainerArguments"], NAMES.prepare)
    account = target.session.client("sts").get_caller_identity()["Account"]
    region = target.session.region_name
    script = steps_dir() / "prepare_data.py"
    counter = {"executor": 0, "hand": 0}

    def through_executor() -> None:
        counter["executor"] += 1
        run_dir = workspace.folder("executor", f"run-{counter['executor']}")
        arn = f"arn:aws:sagemaker:{region}:{account}:pipeline/{PIPELINE}/execution/bench-{uuid.uuid4().hex[:12]}"
        executor = LocalExecutor(target.session, PIPELINE, alone, flanops_home(), run_dir, echo=lambda _line: None,
                                 job_env=target.job_env)
        record = executor.start(parameters, arn)
        if record["PipelineExecutionStatus"] != "Succeeded":
            raise RuntimeError(f"the executor's PrepareData failed: {record.get('FailureReason')}")

    def by_hand() -> None:
        counter["hand"] += 1
        output = workspace.folder("by-hand", f"run-{counter['hand']}") / "data"
        argv = [output.as_posix() if format_value(a) == CONTAINER_OUTPUT else format_value(a) for a in container_args]
        result = subprocess.run([sys.executable, "-u", str(script), *argv], cwd=script.parent,
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"prepare_data.py by hand failed: {result.stderr.strip()[-500:]}")

    times = interleaved({"executor": through_executor, "by hand": by_hand}, min(settings.warmup, 1),
                        settings.repeats, progress, label)
    executor_ms, hand_ms = times["executor"], times["by hand"]
    overhead_ms = statistics.median(executor_ms) - statistics.median(hand_ms)
    figures = {
        "step": NAMES.prepare, "pipeline": PIPELINE,
        "job_arguments": [format_value(a) for a in container_args],
        "executor": spread(executor_ms, "ms"), "by_hand": spread(hand_ms, "ms"),
        "overhead": quantity(round(overhead_ms, 1), "ms", meaning="median executor - median by hand"),
        "ratio": ratio(executor_ms, hand_ms, "executor time / by-hand time"),
        "definition_build": quantity(round(build_seconds, 2), "s",
                                     meaning="once per run: embedded AWS ready + the SDK builds the definition"),
    }
    return SectionResult(figures=figures, notes=[
        f"Execution records of the benchmark's runs are kept under FLANOPS_HOME's executions/{PIPELINE}/, "
        "apart from the real pipelines'."])
