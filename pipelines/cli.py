"""flanops: Flan-T5 through its whole lifecycle as one SageMaker pipeline.

By default every command works against embedded AWS (a moto server on 127.0.0.1 that the
first command starts and later ones reuse; ``flanops local status|stop|env``) and runs jobs on
this machine. ``--aws`` targets your AWS account and SageMaker instead.

Commands import their heavy dependencies lazily so that ``flanops --help`` stays fast and
needs no AWS region.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

from .tables import STEPS


def add_target(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--local", dest="aws", action="store_false", default=False,
                        help="embedded AWS on this machine, jobs run locally (default)")
    target.add_argument("--aws", dest="aws", action="store_true",
                        help="your AWS account: upsert and start on SageMaker")
    parser.add_argument("--role", help="--aws: execution role ARN for the pipeline and its jobs "
                                       "(default: $FLANOPS_ROLE_ARN, or the Studio execution role)")
    parser.add_argument("--bucket", help="--aws: S3 bucket for code and outputs (default: the SageMaker "
                                         "session's default bucket)")


def add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a YAML config or the name of a shipped one (default: quick; "
                                         "see configs/)")
    sections = ", ".join(f"{step.section} ({step.script}.py)" for step in STEPS.values())
    parser.add_argument("--param", dest="params", action="append", default=[], metavar="NAME=VALUE",
                        help="override a pipeline parameter (LoraRank=8) or step setting "
                             "(steps.finetune.max_steps=50: a flag of the step's script without the dashes; "
                             f"steps: {sections}); repeatable")


def add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="also show library messages known to be harmless (transformers' tied-weights notice, "
                             "deprecations inside peft; see steps/stepkit/quiet.py), here and in the local jobs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flanops", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1].split("\n\nCommands")[0], allow_abbrev=False)
    # Subparsers do not inherit allow_abbrev: without it `--out` would pass for `--output-dir`.
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=functools.partial(argparse.ArgumentParser, allow_abbrev=False))

    def pipeline_command(name: str, help_text: str, **kwargs) -> argparse.ArgumentParser:
        """A command that works on the configured pipeline, in embedded AWS or AWS."""
        command = commands.add_parser(name, help=help_text, **kwargs)
        add_config(command)
        add_target(command)
        return command

    run = pipeline_command("run", "build, upsert and run the pipeline (the main job)",
                           description="Build the pipeline definition, upsert it and run one execution: "
                                       "locally on embedded AWS (default) or on SageMaker (--aws).")
    run.add_argument("--output-dir", type=Path, help="local run folder (default: runs/<UTC timestamp>)")
    run.add_argument("--resume", metavar="EXECUTION",
                     help="rerun a failed execution's failed step and what follows (id or ARN)")
    run.add_argument("--no-deploy", dest="deploy", action="store_false",
                     help="locally, stop after registering (by default the package is deployed to the local "
                          "staging stack and invoked once)")
    add_verbose(run)
    pipeline_command("definition", "print the pipeline definition JSON").add_argument(
        "--out", type=Path, help="write it to this file instead of stdout")
    pipeline_command("upsert", "create or update the pipeline")
    start = pipeline_command("start", "start an execution of the upserted pipeline")
    start.add_argument("--output-dir", type=Path, help="local run folder (default: runs/<UTC timestamp>)")
    add_verbose(start)
    report = pipeline_command("report", "write a run's report again: report.html and report.md in its run folder")
    report.add_argument("run", metavar="RUN_OR_EXECUTION", help="a run folder, or an execution id or ARN "
                                                                "(see flanops executions)")
    report.add_argument("--output-dir", type=Path, help="--aws: where the report goes (default: runs/<execution id>)")
    pipeline_command("executions", "list the pipeline's executions")
    pipeline_command("steps", "list an execution's steps").add_argument("execution", help="execution id or ARN")

    approve = pipeline_command("approve", "approve a registered model package (the manual gate before prod)")
    approve.add_argument("model_package", metavar="MODEL_PACKAGE_ARN")
    approve.add_argument("--description", help="why it is approved (kept as the package's ApprovalDescription)")

    deploy = pipeline_command("deploy", "create or update a stage's endpoint stack (CloudFormation)",
                              description="Deploy a model package to a stage's endpoint through a CloudFormation "
                                          "change set; a failed update rolls back and the previous endpoint "
                                          "keeps serving.")
    deploy.add_argument("--stage", required=True, help="staging, prod, or a stage JSON file (see infra/stages/)")
    chosen = deploy.add_mutually_exclusive_group()
    chosen.add_argument("--model-package", metavar="ARN", help="the model package version to deploy")
    chosen.add_argument("--latest-approved", dest="model_package", action="store_const", const=None,
                        help="the group's newest Approved version (the default)")
    deploy.add_argument("--dry-run", action="store_true", help="write the template (and lint it); deploy nothing")
    deploy.add_argument("--no-lint", dest="lint", action="store_false",
                        help="skip cfn-lint before deploying (its list of instance types can lag behind AWS)")
    deploy.add_argument("--out", type=Path, help="--dry-run: the template file (default: <stage>-template.json)")

    role = commands.add_parser(
        "role", help="write the pipeline execution role (least privilege) as a CloudFormation template",
        description="Write the IAM role that the pipeline and its jobs run as (--role of run --aws), scoped to "
                    "the configured pipeline: its S3 prefix, jobs, model package group, images, KMS key and VPC. "
                    "The template is checked with cfn-lint; nothing is deployed.")
    add_config(role)
    role.add_argument("--out", type=Path, default=Path("pipeline-role.json"),
                      help="the template file (default: pipeline-role.json)")
    role.add_argument("--bucket", help="the bucket the pipeline uses (default: the account's SageMaker default "
                                       "bucket, sagemaker-<region>-<account>)")
    role.add_argument("--region", help="the region the pipeline runs in (default: your AWS configuration's)")

    destroy = pipeline_command("destroy", "delete a stage's endpoint stack")
    destroy.add_argument("--stage", required=True, help="staging, prod, or a stage name")

    serve = pipeline_command("serve", "serve a model here as a SageMaker endpoint (the container contract "
                                      "and the Runtime API)")
    source = serve.add_mutually_exclusive_group()
    source.add_argument("--stage", help="the model deployed to this stage (default: staging)")
    source.add_argument("--model-package", metavar="ARN", help="a registered model package version")
    source.add_argument("--model-data", metavar="S3_OR_PATH", help="a model.tar.gz (S3 URI or file) or its "
                                                                    "extracted folder")
    serve.add_argument("--port", type=int, default=8080, help="default: 8080 (0 picks a free port)")
    serve.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only)")
    serve.add_argument("--endpoint-name", help="the name it answers to on /endpoints/{name}/invocations "
                                               "(default: the stage's endpoint name)")
    add_verbose(serve)

    invoke = pipeline_command("invoke", "summarize a dialogue with an endpoint")
    invoke.add_argument("text", help="the dialogue; - reads it from standard input")
    invoke.add_argument("--endpoint", help="endpoint name (default: the one being served locally; with --aws: "
                                           "the --stage's endpoint)")
    invoke.add_argument("--stage", default="staging", help="--aws without --endpoint: the stage (default staging)")
    invoke.add_argument("--max-new-tokens", type=int, help="longest summary, in tokens")
    invoke.add_argument("--num-beams", type=int, help="beam search width (1: greedy)")

    bench = commands.add_parser(
        "bench", help="benchmark quantization (beside CTranslate2 and ONNX Runtime), distillation, pruning, LoRA, "
                      "serving and the local executor",
        description="Measure what each optimization saves and what serving and the local executor cost, on "
                    "random-weight Flan-T5 models of the real dimensions, with the CPU runtimes of the field "
                    "(CTranslate2 int8, ONNX Runtime int8 through optimum) measured in the same run; writes "
                    "results.json and BENCHMARKS.md "
                    "(with charts). The full run is meant to stay under 30 minutes on 2 cores, --quick under 5.")
    bench.add_argument("--quick", action="store_true", help="fewer repetitions, shorter inputs and loads (a few minutes)")
    bench.add_argument("--models", default="flan-t5-small,flan-t5-base",
                       help="comma-separated Flan-T5 sizes for quantization, distillation and pruning (the first "
                            "is also served); default: flan-t5-small,flan-t5-base")
    bench.add_argument("--sections", help="comma-separated subset of quantization,peers,distillation,pruning,lora,"
                                          "serving,executor (default: all)")
    bench.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<UTC timestamp>)")

    local = commands.add_parser("local", help="the embedded AWS server: status, stop, or env (the shell lines "
                                              "that point the AWS CLI and boto3 at it)")
    local.add_argument("action", choices=("status", "stop", "env"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .errors import FlanopsError
    from stepkit.quiet import VERBOSE_ENV, quiet_known_noise

    if getattr(args, "verbose", False):
        os.environ[VERBOSE_ENV] = "1"   # local jobs inherit this process's environment
    quiet_known_noise()

    try:
        if args.command == "local":
            return local_command(args.action)
        return call_command(args)
    except FlanopsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        # Lost AWS and full or read-only disks can strike anywhere; anything else is a bug and keeps its traceback.
        from .failures import known_failure

        failure = known_failure(f"flanops {args.command}", err, os.environ.get("AWS_ENDPOINT_URL"))
        if failure is None:
            raise
        print(f"error: {failure}", file=sys.stderr)
        return 1


def call_command(args: argparse.Namespace) -> int:
    """Call the typed function that ``args.command`` names with the parsed options: the config loaded (with its
    --param overrides), --aws/--role/--bucket as a TargetChoice, the rest by name."""
    import inspect

    from flanops import benchmarks
    from . import endpoint_commands, pipeline_commands
    from .config import load_config
    from .targets import TargetChoice

    # Each command is the function of its name in the module of what it acts on.
    home = (benchmarks if args.command == "bench" else
            endpoint_commands if args.command in ("approve", "deploy", "destroy", "serve", "invoke") else
            pipeline_commands)
    command = getattr(home, args.command)
    options = {name: value for name, value in vars(args).items() if name not in ("command", "verbose")}
    if "aws" in options:
        options["target"] = TargetChoice(options.pop("aws"), options.pop("role"), options.pop("bucket"))
    if "config" in options:
        config, params = options.pop("config"), options.pop("params")
        if "config" in inspect.signature(command).parameters:   # approve works on a package ARN, not the config
            options["config"] = load_config(config, params)
    return command(**options)


def local_command(action: str) -> int:
    from .embedded import ensure_server, server_status, stop_server

    if action == "status":
        aws = server_status()
        if aws is None:
            print("embedded AWS: not running (the next flanops command starts it)")
            return 1
        print(f"embedded AWS: running at {aws.endpoint_url} (pid {aws.pid}, region {aws.region})")
        print('use it from another shell:  eval "$(flanops local env)"')
        return 0
    if action == "env":   # starts the server if needed: the lines are for a shell that will use it
        print("\n".join(ensure_server().shell_lines()))
        return 0
    print("embedded AWS: stopped" if stop_server() else "embedded AWS: was not running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
