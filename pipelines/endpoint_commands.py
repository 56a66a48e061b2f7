"""The commands that act on the model registry and the endpoints: approve, deploy, destroy, serve and
invoke, and the deploy and sample invocation that follow a successful local run."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

from flanops.infra.deploy import approve as approve_package
from flanops.infra.deploy import deploy as deploy_stack
from flanops.infra.deploy import deployed, describe_package, resolve_package
from flanops.infra.deploy import destroy as destroy_stack
from flanops.infra.deploy import dry_run as write_dry_run
from flanops.infra.endpoint_client import (endpoint_record, running_endpoints, runtime_client, serve_in_subprocess,
                                          summarize_remotely)
from flanops.infra.serving import DataCapture, serving
from flanops.infra.stages import load_stage
from stepkit.metrics import stated_facts

from .config import PipelineConfig
from .errors import FlanopsError
from .files import write_json_atomic
from .targets import LOCAL, Target, TargetChoice, aws_session, default_bucket, embedded_bucket, target_session

# The sample invocation after a local run: a dialogue written by hand, not by the data generator, and the
# facts a summary of it must state.
SAMPLE = {"dialogue": "#Person1#: Hi, I'd like to book a table for four at 7 pm on Friday.\n"
                      "#Person2#: Sure, under what name?\n#Person1#: Johnson.",
          "facts": {"speakers": ["Johnson"], "count": "four", "time": "7 pm", "day": "Friday"}}


def deploy_and_try(target: Target, run_dir: Path, stage_name: str = "staging") -> int:
    """After a local run: deploy the registered package to the local stage's stack and invoke it once."""
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    arn = summary.get("model_package_arn")
    if not arn:
        return 0
    stage = load_stage(stage_name)
    print(f"\ndeploying {arn} to the local {stage.name} stage (CloudFormation on embedded AWS)")
    try:
        package = resolve_package(target.session, model_package_arn=arn, stage=stage)
        result = deploy_stack(target.session, stage, package, default_bucket=target.bucket)
        dialogue = SAMPLE["dialogue"]
        generated = sample_invocation(arn, result.endpoint_name, target.session.region_name, dialogue)
    except FlanopsError as err:
        raise FlanopsError(f"the pipeline succeeded and registered {arn}, but deploying it to {stage.name} "
                           f"failed: {err}") from None
    print(f"\nsample invocation of endpoint {result.endpoint_name} (through model.tar.gz's code/inference.py):")
    print("  dialogue: " + dialogue.replace("\n", "\n            "))
    print(f"  summary:  {generated}")
    stated = {value: said for values in stated_facts(generated, SAMPLE["facts"]).values() for value, said in values}
    print("  facts:    " + ", ".join(f"{value} {'stated' if said else 'MISSING'}" for value, said in stated.items()))
    print(f"\nnext: flanops serve --stage {stage.name}   (then flanops invoke \"...\" or boto3 invoke_endpoint)\n"
          f"      flanops approve {arn} && flanops deploy --stage prod --latest-approved --dry-run")
    summary["deployment"] = {"stage": stage.name, "stack": result.stack_name, "endpoint_name": result.endpoint_name,
                             "model_package_arn": arn, "sample": {"dialogue": dialogue, "summary": generated, "facts_stated": stated}}
    write_json_atomic(summary_file, summary)
    return 0


def sample_invocation(package_arn: str, endpoint_name: str, region: str, dialogue: str) -> str:
    """One request through the Runtime API to the endpoint as ``flanops serve`` runs it, in its own process.

    A process of its own also keeps torch out of the run's process, whose mix of native libraries
    (pyarrow, scipy, torch) sometimes aborted at exit after serving from a thread.
    """
    with serve_in_subprocess("--model-package", package_arn, "--endpoint-name", endpoint_name) as url:
        return summarize_remotely(runtime_client(url, region), endpoint_name, [dialogue])[0]


def package_group(config: PipelineConfig) -> str:
    return config.parameter_values()["ModelPackageGroupName"]


def approve(model_package: str, description: str | None = None, target: TargetChoice = LOCAL) -> int:
    package = approve_package(target_session(target), model_package, description)
    print(f"approved {package['ModelPackageArn']} (group {package['ModelPackageGroupName']}, "
          f"version {package.get('ModelPackageVersion')})")
    return 0


def deploy(config: PipelineConfig, stage: str, target: TargetChoice = LOCAL, model_package: str | None = None,
           dry_run: bool = False, lint: bool = True, out: Path | None = None) -> int:
    """Deploy ``model_package`` (default: the group's newest Approved version) to ``stage``'s endpoint stack."""
    stage = load_stage(stage)
    if out and not dry_run:
        raise FlanopsError("--out goes with --dry-run (a deploy writes no template file)")
    session = target_session(target)
    kms_key_id = config.security.kms_key_id
    bucket = target.bucket or (default_bucket(session, kms_key_id) if target.aws else embedded_bucket(session, kms_key_id))
    package = resolve_package(session, model_package_arn=model_package, latest_approved=not model_package,
                              group=package_group(config), stage=stage)
    if dry_run:
        write_dry_run(stage, package, default_bucket=bucket, out=out or Path(f"{stage.name}-template.json"))
        return 0
    result = deploy_stack(session, stage, package, default_bucket=bucket, lint=lint)
    if not target.aws:
        print(f"embedded AWS runs no containers; serve this endpoint here with: flanops serve --stage {stage.name}")
    return 0 if result.endpoint_name else 1


def destroy(config: PipelineConfig, stage: str, target: TargetChoice = LOCAL) -> int:
    destroy_stack(target_session(target), stage, package_group(config))
    return 0


def serve(config: PipelineConfig, target: TargetChoice = LOCAL, stage: str | None = None,
          model_package: str | None = None, model_data: str | None = None, endpoint_name: str | None = None,
          host: str = "127.0.0.1", port: int = 8080) -> int:
    """Serve one model here as a SageMaker endpoint: ``stage``'s (default staging), a package's or a model.tar.gz."""
    session = target_session(target)
    source, endpoint_name, package_arn = model_to_serve(session, package_group(config), stage, model_package,
                                                        model_data, endpoint_name)
    record = {"model_data": str(source), "model_package_arn": package_arn, "region": session.region_name}
    # A deployed stage's endpoint captures as its EndpointConfig says; a model served by itself does not
    capture = DataCapture.of_endpoint(session, endpoint_name) if not (model_data or model_package) else None
    if capture:
        print(f"capturing {capture.sampling_percentage}% of invocations to {capture.destination}/{endpoint_name}/")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with serving(source, session, endpoint_name, host=host, port=port, record=record,
                 capture=capture) as server:
        # boto3 needs a region and keys to sign even for a local URL: moto's dummies, nothing is sent to AWS
        print(f"endpoint {endpoint_name} is serving at {server.url} (GET /ping, POST /invocations, "
              f"POST /endpoints/{endpoint_name}/invocations); Ctrl-C stops it\n"
              f"try it: flanops invoke \"#Person1#: ... #Person2#: ...\"\n"
              f"or boto3: boto3.client('sagemaker-runtime', endpoint_url='{server.url}', "
              f"region_name='{session.region_name}', aws_access_key_id='testing', aws_secret_access_key='testing')"
              f".invoke_endpoint(EndpointName='{endpoint_name}', ContentType='application/json', "
              "Body='{\"inputs\": \"...\"}')\n"
              "or any AWS client on embedded AWS (eval \"$(flanops local env)\"): "
              f"aws sagemaker-runtime invoke-endpoint --endpoint-name {endpoint_name} ...", flush=True)
        if not (model_data or model_package):
            watch_stage(session, package_group(config), stage or "staging", package_arn, endpoint_name, stop)
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
    print(f"endpoint {endpoint_name} stopped")
    return 0


def watch_stage(session, group: str, stage: str, served_arn: str | None, endpoint_name: str, stop: threading.Event,
                every_seconds: float = 5.0) -> None:
    """While a stage's endpoint is served here: when the stage is redeployed, say once that this server still
    serves the earlier package, here and in its announcement (``flanops invoke`` repeats it)."""
    def watch() -> None:
        while not stop.wait(every_seconds):
            try:
                current = deployed(session, stage, group)
            except Exception:  # nosec B112 # embedded AWS stopped: nothing to compare with, the model still serves
                continue
            if current and current.model_package_arn and current.model_package_arn != served_arn:
                print(f"stage {stage} was redeployed with {current.model_package_arn}; this server still serves "
                      f"{served_arn}: restart it (Ctrl-C, then flanops serve --stage {stage}) to serve the new one",
                      flush=True)
                path = endpoint_record(endpoint_name, os.getpid())
                announcement = json.loads(path.read_text(encoding="utf-8"))
                write_json_atomic(path, {**announcement, "superseded_by": current.model_package_arn})
                return

    threading.Thread(target=watch, name=f"watch-{stage}", daemon=True).start()


def model_to_serve(session, group: str, stage: str | None, model_package: str | None, model_data: str | None,
                   endpoint_name: str | None) -> tuple[str, str, str | None]:
    """(model data, endpoint name, model package ARN) for ``flanops serve``'s choice of model."""
    if model_data:
        return model_data, endpoint_name or "flanops-local", None
    if model_package:
        package = describe_package(session.client("sagemaker"), model_package)
        name = endpoint_name or f"{package['ModelPackageGroupName']}-v{package.get('ModelPackageVersion', 0)}"
        return model_data_url(package), name, package["ModelPackageArn"]
    stage = stage or "staging"
    result = deployed(session, stage, group)
    if result is None or not result.endpoint_name:
        raise FlanopsError(f"nothing is deployed to stage {stage} for model package group {group}; deploy first: "
                           f"flanops deploy --stage {stage} (or serve --model-package ARN / --model-data PATH)")
    package = describe_package(session.client("sagemaker"), result.model_package_arn)
    return model_data_url(package), endpoint_name or result.endpoint_name, package["ModelPackageArn"]


def model_data_url(package: dict) -> str:
    containers = package.get("InferenceSpecification", {}).get("Containers", [])
    if not containers or not containers[0].get("ModelDataUrl"):
        raise FlanopsError(f"model package {package['ModelPackageArn']} names no ModelDataUrl to serve")
    return containers[0]["ModelDataUrl"]


def invoke(config: PipelineConfig, text: str, target: TargetChoice = LOCAL, endpoint: str | None = None,
           stage: str = "staging", max_new_tokens: int | None = None, num_beams: int | None = None) -> int:
    """Summarize ``text`` (``-``: standard input) with an endpoint: the one served here, or ``stage``'s on AWS."""
    text = sys.stdin.read() if text == "-" else text
    if not text.strip():
        raise FlanopsError("nothing to summarize: give the dialogue as the argument, or - to read standard input")
    parameters = {name: value for name, value in (("max_new_tokens", max_new_tokens),
                                                  ("num_beams", num_beams)) if value is not None}
    if target.aws:
        session = aws_session()
        name = endpoint or deployed_endpoint(session, config, stage)
        client = session.client("sagemaker-runtime")
    else:
        endpoints = running_endpoints()
        if not endpoints:
            raise FlanopsError("no local endpoint is being served; start one in another shell: "
                               "flanops serve --stage staging")
        if endpoint and endpoint not in endpoints:
            raise FlanopsError(f"no local endpoint {endpoint!r}; being served: {', '.join(endpoints)}")
        if not endpoint and len(endpoints) > 1:
            raise FlanopsError(f"several local endpoints are being served ({', '.join(endpoints)}); pick one "
                               "with --endpoint NAME")
        record = endpoints[endpoint or next(iter(endpoints))]
        if record.get("superseded_by"):
            print(f"warning: {record['endpoint_name']} serves {record.get('model_package_arn')}, but its stage was "
                  f"redeployed with {record['superseded_by']}; restart flanops serve to serve that", file=sys.stderr)
        name, client = record["endpoint_name"], runtime_client(record["url"], record["region"])
    print(summarize_remotely(client, name, [text], parameters)[0])
    return 0


def deployed_endpoint(session, config: PipelineConfig, stage: str) -> str:
    result = deployed(session, stage, package_group(config))
    if result is None or not result.endpoint_name:
        raise FlanopsError(f"no endpoint deployed to stage {stage}; pass --endpoint NAME or deploy first")
    return result.endpoint_name


