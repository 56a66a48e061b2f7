"""flanops from Python: what the notebooks (and scripts) call.

Each function calls the same typed function of ``commands`` as the ``flanops`` command it names
(``run`` is ``flanops run``), against embedded AWS by default or your account with ``aws=True``, and
returns what a notebook wants to look at: the run folder, its summary and report, pandas tables and
PNG charts. ``params`` are typed values by name: ``{"LoraRank": 8, "steps.finetune.max_steps": 50}``.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .errors import FlanopsError

T = TypeVar("T")


def call(command: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A command as ``flanops`` runs it: known harmless library noise hidden, and a failure the CLI explains in
    one line (AWS unreachable, a full disk) raised as a FlanopsError with that line. Returns its exit code
    (1: the execution ran and failed; its summary says why)."""
    from .failures import known_failure
    from stepkit.quiet import quiet_known_noise

    quiet_known_noise()
    try:
        return command(*args, **kwargs)
    except FlanopsError:
        raise
    except Exception as err:
        failure = known_failure(f"flanops {command.__name__}", err, os.environ.get("AWS_ENDPOINT_URL"))
        if failure is None:
            raise
        raise FlanopsError(str(failure)) from None


def target(aws: bool = False):
    """Embedded AWS, or with ``aws`` your account (role from $FLANOPS_ROLE_ARN or Studio, the default bucket)."""
    from .targets import TargetChoice

    return TargetChoice(aws=aws)


@dataclass
class Run:
    run_dir: Path
    code: int

    @property
    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text(encoding="utf-8"))

    @property
    def report_html(self) -> Path:
        return self.run_dir / "report.html"

    @property
    def model_package_arn(self) -> str | None:
        return self.summary.get("model_package_arn")

    def facts(self):
        """The report's facts (steps, gate, variants, curves, data card, samples) of this run."""
        return run_facts(self.run_dir)


def run(config: str | None = None, params: dict[str, Any] | None = None, output_dir: str | Path | None = None,
        deploy: bool = True) -> Run:
    """``flanops run`` on embedded AWS: the whole pipeline, its report and (``deploy``) the staging deploy."""
    from datetime import datetime, timezone

    from . import pipeline_commands
    from .config import load_config

    run_dir = Path(output_dir or Path("runs") / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")).absolute()
    code = call(pipeline_commands.run, load_config(config, params or {}), target(), output_dir=run_dir, deploy=deploy)
    return Run(run_dir, code)


def session(aws: bool = False):
    """A boto3 Session on embedded AWS (started if needed) or, with ``aws``, on your account."""
    from .targets import target_session

    return target_session(target(aws))


def run_facts(run_or_execution: str | Path, config: str | None = None):
    """The report's facts of a local run folder, or of an execution id or ARN of the configured pipeline."""
    from .config import load_config
    from .home import flanops_home
    from .runfacts import collect, find_record, run_definition

    record = find_record(flanops_home(), load_config(config).pipeline_name, str(run_or_execution))
    return collect(session(), record, run_definition(record))


def variants_table(facts):
    """Every evaluated variant (base, fine-tuned, optimized) as a pandas DataFrame, as the report shows it."""
    import pandas as pd

    from .report import variant_rows

    return pd.DataFrame(variant_rows(facts)).set_index("variant")


def steps_table(facts):
    import pandas as pd

    return pd.DataFrame(facts.steps).set_index("name")


def charts(facts) -> dict[str, bytes]:
    """The report's charts as PNG bytes: display them with IPython.display.Image(data)."""
    from .report import draw_charts

    return draw_charts(facts)


def definition_graph(definition: dict) -> bytes:
    """A pipeline definition's graph (steps not run yet) as PNG bytes."""
    from .stepgraph import StepGraph
    from .report import graph_chart

    graph = StepGraph.of(definition)
    return graph_chart(graph, [{"name": name, "status": "not run", "seconds": None, "cached": False}
                               for name in graph.order()])


def definition(config: str | None = None, params: dict[str, Any] | None = None, aws: bool = False) -> dict:
    """The pipeline definition ``flanops definition`` builds (for your account with ``aws``)."""
    from . import pipeline_commands
    from .config import load_config

    return json.loads(call(pipeline_commands.definition_text, load_config(config, params or {}), target(aws)))


def start(config: str | None = None, params: dict[str, Any] | None = None, aws: bool = False,
          output_dir: str | Path | None = None) -> int:
    """``flanops upsert`` then ``flanops start``: on embedded AWS the execution runs here, to its end."""
    from . import pipeline_commands
    from .config import load_config

    loaded = load_config(config, params or {})
    call(pipeline_commands.upsert, loaded, target(aws))
    return call(pipeline_commands.start, loaded, target(aws),
                output_dir=Path(output_dir).absolute() if output_dir else None)


def executions(config: str | None = None, aws: bool = False) -> int:
    """``flanops executions``: print the pipeline's executions."""
    from . import pipeline_commands
    from .config import load_config

    return call(pipeline_commands.executions, load_config(config), target(aws))


def approve(model_package_arn: str, description: str | None = None, aws: bool = False) -> int:
    """``flanops approve``: approve a registered model package version (the manual gate before prod)."""
    from . import endpoint_commands

    return call(endpoint_commands.approve, model_package_arn, description, target(aws))


def deploy(stage: str, config: str | None = None, model_package_arn: str | None = None, aws: bool = False,
           dry_run: bool = False) -> int:
    """``flanops deploy``: a model package (default: the group's newest Approved one) to ``stage``'s stack."""
    from . import endpoint_commands
    from .config import load_config

    return call(endpoint_commands.deploy, load_config(config), stage, target(aws), model_package=model_package_arn,
                dry_run=dry_run)


def model_packages(config: str | None = None, aws: bool = False):
    """The configured model package group's versions, newest first, as a pandas DataFrame."""
    import pandas as pd

    from .endpoint_commands import package_group
    from .config import load_config

    group = package_group(load_config(config))
    pages = session(aws).client("sagemaker").get_paginator("list_model_packages").paginate(
        ModelPackageGroupName=group, SortBy="CreationTime", SortOrder="Descending")
    rows = [{"arn": p["ModelPackageArn"], "version": p.get("ModelPackageVersion"),
             "status": p.get("ModelApprovalStatus"), "created": str(p.get("CreationTime", ""))[:19]}
            for page in pages for p in page["ModelPackageSummaryList"]]
    return pd.DataFrame(rows, columns=["arn", "version", "status", "created"])


def sample_dialogues(count: int, seed: int = 11) -> list[str]:
    """``count`` synthetic dialogues (not in any run's data: another seed) to send to an endpoint."""
    from stepkit.synthetic import generate_splits

    return [row["dialogue"] for row in generate_splits({"test": count}, seed)["test"]]


# ----------------------------------------------------------------------------- Studio and SageMaker
def studio_execution_role() -> str | None:
    """The execution role when this runs in SageMaker Studio (or a notebook instance) with one, else None.

    Studio kernels have /opt/ml/metadata/resource-metadata.json; the role then comes from the SDK,
    as in any Studio notebook. Elsewhere (a laptop, CI) there is none and flanops uses embedded AWS.
    """
    if not Path("/opt/ml/metadata/resource-metadata.json").is_file():
        return None
    try:
        from sagemaker.core.helper.session_helper import get_execution_role

        return get_execution_role()
    except Exception:   # noqa: BLE001 - in Studio without a usable role: embedded AWS, as outside Studio
        return None


# ----------------------------------------------------------------------------- endpoints
@dataclass
class LocalEndpoint:
    name: str
    url: str
    region: str

    @property
    def client(self):
        """A boto3 sagemaker-runtime client for this endpoint (invoke_endpoint as on SageMaker)."""
        from flanops.infra.endpoint_client import runtime_client

        return runtime_client(self.url, self.region)

    def summarize(self, dialogues: list[str] | str, **parameters) -> list[str]:
        from flanops.infra.endpoint_client import summarize_remotely

        return summarize_remotely(self.client, self.name, [dialogues] if isinstance(dialogues, str) else dialogues,
                                  parameters or None)


@contextlib.contextmanager
def serve(stage: str | None = "staging", model_package_arn: str | None = None,
          endpoint_name: str | None = None, config: str | None = None) -> Iterator[LocalEndpoint]:
    """``flanops serve`` (a stage's endpoint, or one model package) in its own process while the block runs."""
    from flanops.infra.endpoint_client import serve_in_subprocess

    chosen = ["--model-package", model_package_arn] if model_package_arn else ["--stage", stage or "staging"]
    name_flags = ["--endpoint-name", endpoint_name] if endpoint_name else []
    with serve_in_subprocess(*(["--config", config] if config else []), *chosen, *name_flags) as url:
        from flanops.infra.endpoint_client import running_endpoints

        record = next((r for r in running_endpoints().values() if r["url"] == url), None)
        if record is None:
            raise FlanopsError(f"the endpoint at {url} did not announce itself in FLANOPS_HOME/endpoints")
        yield LocalEndpoint(record["endpoint_name"], url, record["region"])


def captured_records(stage: str = "staging", config: str | None = None, aws: bool = False) -> list[dict]:
    """The data-capture records of a stage's endpoint (oldest first), as SageMaker writes them to S3."""
    from .config import load_config
    from .endpoint_commands import package_group
    from flanops.infra.deploy import deployed
    from flanops.infra.serving import read_capture

    chosen = session(aws)
    result = deployed(chosen, stage, package_group(load_config(config)))
    if result is None or not result.endpoint_name:
        raise FlanopsError(f"nothing is deployed to stage {stage}; deploy first: flanops deploy --stage {stage}")
    destination = result.outputs.get("DataCaptureS3Uri")
    if not destination:
        raise FlanopsError(f"stage {stage}'s endpoint does not capture data (infra/stages/{stage}.json: data_capture)")
    return read_capture(chosen.client("s3"), destination, result.endpoint_name)


def compare_packages(arns: list[str], aws: bool = False):
    """Registered model package versions side by side: status, variant, and their ModelQuality metrics."""
    import pandas as pd

    from flanops.infra.deploy import describe_package
    from .runfacts import read_s3_file

    chosen = session(aws)
    sagemaker, s3 = chosen.client("sagemaker"), chosen.client("s3")
    rows = {}
    for arn in arns:
        package = describe_package(sagemaker, arn)
        row = {"version": package.get("ModelPackageVersion"), "status": package.get("ModelApprovalStatus"),
               "created": str(package.get("CreationTime", ""))[:19], **(package.get("CustomerMetadataProperties") or {})}
        statistics = package.get("ModelMetrics", {}).get("ModelQuality", {}).get("Statistics", {}).get("S3Uri")
        if statistics:
            prefix, name = statistics.rsplit("/", 1)
            document = json.loads(read_s3_file(s3, prefix, name) or b"{}")
            for metric, entry in document.get("summarization_metrics", {}).items():
                row[metric] = entry.get("value")
        rows[arn.rsplit("/", 2)[-2] + "/" + arn.rsplit("/", 1)[-1]] = row
    return pd.DataFrame(rows)
