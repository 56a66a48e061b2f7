"""A ``Model`` step (the SDK's ModelStep with a CreateModel request): the model created in the target's SageMaker.

SageMaker creates the model under a name of its own (the SDK leaves ``ModelName`` out of the
definition unless PipelineDefinitionConfig keeps it), and the step's properties are what
DescribeModel answers for it, so that ``Steps.<name>.ModelName`` reaches a TransformStep. Nothing
runs: a model is a record pointing at an image and its ``model.tar.gz``.
"""
from __future__ import annotations

import json
import re
from typing import Any

from .failures import StepFailed

MODEL_NAME = re.compile(r"[a-zA-Z0-9]([\-a-zA-Z0-9]*[a-zA-Z0-9])?")   # CreateModel's ModelName, at most 63


def create_model(sagemaker, step_name: str, name: str, arguments: dict[str, Any]) -> tuple[dict, str]:
    """CreateModel with the step's resolved ``arguments`` under ``name`` (unless the definition names the
    model itself; the executor names it as its jobs); returns (its DescribeModel response as properties, its ARN)."""
    from botocore.exceptions import ClientError, ParamValidationError

    request = {key: value for key, value in arguments.items() if value not in ({}, None, [])}
    request.setdefault("ModelName", name)
    if not MODEL_NAME.fullmatch(request["ModelName"]) or len(request["ModelName"]) > 63:
        raise StepFailed(f"{step_name}: model name {request['ModelName']!r} is not one SageMaker accepts "
                         "(letters, digits and hyphens, at most 63)")
    try:
        arn = sagemaker.create_model(**request)["ModelArn"]
        described = sagemaker.describe_model(ModelName=request["ModelName"])
    except (ClientError, ParamValidationError) as err:
        raise StepFailed(f"{step_name}: CreateModel: {err}") from None
    described.pop("ResponseMetadata", None)
    # what the record keeps is JSON (CreationTime is a datetime): as DescribeModel reads over the wire
    return json.loads(json.dumps(described, default=str)), arn
