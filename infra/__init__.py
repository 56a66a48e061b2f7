"""Infrastructure as code for the endpoint stack (issue 6).

- ``stages``: stage configs (``stages/staging.json``, ``stages/prod.json`` or a JSON path).
- ``template``: the CloudFormation template built from a model package and a stage.
- ``deploy``: approve a package, pick the package to deploy, deploy/update/destroy the stack.
- ``pipeline_role``: the pipeline's least-privilege execution role (policy and template).
- ``buckets``: buckets flanops creates, locked down (public access blocked, TLS only, encrypted).
"""
from .deploy import DeployResult, approve, deploy, deployed, describe_package, destroy, dry_run, resolve_package
from .stages import StageConfig, load_stage
from .template import build_template, lint_template, stack_name

__all__ = ["DeployResult", "StageConfig", "approve", "build_template", "deploy", "deployed", "describe_package",
           "destroy", "dry_run",
           "lint_template", "load_stage", "resolve_package", "stack_name"]
