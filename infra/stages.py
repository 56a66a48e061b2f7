"""Stage configs: how one deployment stage (``staging``, ``prod``, …) hosts a model package.

A stage is a JSON file, as in SageMaker's MLOps "model deploy" project template
(``staging-config.json``, ``prod-config.json``). Shipped stages live in ``infra/stages/``;
``--stage`` takes a shipped stage's name or a path to a JSON file of the same shape:

    {"require_approval": true, "instance_type": "ml.m5.xlarge", "initial_instance_count": 2,
     "autoscaling": {"min_capacity": 2, "max_capacity": 4, "target_invocations_per_instance": 70},
     "data_capture": {"enabled": true, "sampling_percentage": 20},
     "alarms": {"max_5xx_errors": 0, "max_model_latency_ms": 1500}}

A stage hosts either on instances (``instance_type`` + count, optional autoscaling and data
capture) or serverless (``serverless``: memory and concurrency; SageMaker serverless endpoints
have no instance type, no autoscaling target and no data capture).
"""
from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StringConstraints, ValidationError, model_validator

from flanops.pipelines.errors import FlanopsError

STAGE_NAME_PATTERN = r"^[a-zA-Z][a-zA-Z0-9]*(-[a-zA-Z0-9]+)*$"
SERVERLESS_MEMORY_SIZES_MB = (1024, 2048, 3072, 4096, 5120, 6144)  # the sizes SageMaker offers
# A KMS key id, key ARN, alias name or alias ARN: what SageMaker's KmsKeyId accepts.
KMS_KEY_PATTERN = (r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|mrk-[0-9a-f]{32}"
                   r"|alias/[a-zA-Z0-9/_-]+|arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:(key|alias)/[a-zA-Z0-9/_-]+)$")
# EC2 resource ids: 8 hex digits (older resources) or 17.
SUBNET_ID_PATTERN = r"^subnet-([0-9a-f]{8}|[0-9a-f]{17})$"
SECURITY_GROUP_ID_PATTERN = r"^sg-([0-9a-f]{8}|[0-9a-f]{17})$"


class StageConfigError(FlanopsError):
    """A stage config problem: which file, which field, what to change."""


class Autoscaling(BaseModel):
    """Target tracking on SageMakerVariantInvocationsPerInstance (instance stages only)."""

    model_config = ConfigDict(extra="forbid")

    min_capacity: int = Field(ge=1, le=100, description="fewest instances autoscaling may scale in to")
    max_capacity: int = Field(ge=1, le=100, description="most instances autoscaling may scale out to")
    target_invocations_per_instance: float = Field(
        70.0, gt=0, description="invocations per instance per minute that autoscaling keeps the variant at")
    scale_in_cooldown_seconds: int = Field(300, ge=0, le=3600, description="wait after a scale-in, seconds")
    scale_out_cooldown_seconds: int = Field(60, ge=0, le=3600, description="wait after a scale-out, seconds")

    @model_validator(mode="after")
    def _min_not_above_max(self) -> Autoscaling:
        if self.min_capacity > self.max_capacity:
            raise ValueError(f"min_capacity ({self.min_capacity}) is above max_capacity ({self.max_capacity})")
        return self


class DataCapture(BaseModel):
    """Endpoint data capture (requests and responses) to S3."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    sampling_percentage: int = Field(100, ge=0, le=100, description="share of requests captured, percent")
    s3_uri: str | None = Field(None, pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$", description=(
        "capture destination; default s3://<default bucket>/<model package group>/<stage>/data-capture"))


class Vpc(BaseModel):
    """The VPC that jobs or an endpoint run in (SageMaker's VpcConfig): its subnets and security groups."""

    model_config = ConfigDict(extra="forbid")

    subnets: list[Annotated[str, StringConstraints(pattern=SUBNET_ID_PATTERN)]] = Field(
        min_length=1, max_length=16, description="subnet ids (subnet-…), in the VPC of the security groups")
    security_group_ids: list[Annotated[str, StringConstraints(pattern=SECURITY_GROUP_ID_PATTERN)]] = Field(
        min_length=1, max_length=5, description="security group ids (sg-…)")


class Serverless(BaseModel):
    """SageMaker serverless inference, for low-traffic stages."""

    model_config = ConfigDict(extra="forbid")

    memory_size_mb: Literal[SERVERLESS_MEMORY_SIZES_MB] = Field(2048, description="memory per worker, MB")
    max_concurrency: int = Field(5, ge=1, le=200, description="concurrent invocations before throttling")


class Alarms(BaseModel):
    """CloudWatch alarms on the endpoint variant (namespace AWS/SageMaker)."""

    model_config = ConfigDict(extra="forbid")

    max_5xx_errors: int = Field(0, ge=0, description="Invocation5XXErrors per period above which the alarm fires")
    max_model_latency_ms: float = Field(2000.0, gt=0, description="average ModelLatency above which the alarm fires, ms")
    period_seconds: int = Field(300, ge=60, le=86400, multiple_of=60, description="alarm period, seconds")
    evaluation_periods: int = Field(1, ge=1, le=100)
    notify_topic_arn: str | None = Field(None, pattern=r"^arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[A-Za-z0-9_.-]+$",
                                         description="SNS topic told when an alarm fires (optional)")


class StageConfig(BaseModel):
    """One deployment stage. ``name`` defaults to the file's stem."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=STAGE_NAME_PATTERN, max_length=32)
    require_approval: bool = Field(True, description=(
        "true: only Approved packages deploy; false: a registered package still PendingManualApproval "
        "(it passed the pipeline's quality gate) deploys too"))
    instance_type: str | None = Field(None, pattern=r"^ml\.[a-z0-9]+\.[a-z0-9]+$")
    initial_instance_count: int | None = Field(None, ge=1, le=100)
    autoscaling: Autoscaling | None = None
    data_capture: DataCapture = DataCapture()
    kms_key_id: str | None = Field(None, pattern=KMS_KEY_PATTERN, description=(
        "KMS key for the instances' storage volume and the captured data (optional)"))
    vpc: Vpc | None = Field(None, description="run the model in these subnets and security groups (optional)")
    network_isolation: bool = Field(False, description=(
        "no network access for the model container (model.tar.gz's code needs none)"))
    serverless: Serverless | None = None
    alarms: Alarms = Alarms()
    _source: str = PrivateAttr("<memory>")

    @model_validator(mode="after")
    def _hosting_is_consistent(self) -> StageConfig:
        if self.serverless is not None:
            conflicting = [field for field in ("instance_type", "initial_instance_count", "autoscaling", "kms_key_id")
                           if getattr(self, field) is not None]
            if conflicting:
                raise ValueError(f"a serverless stage has no {conflicting[0]} (SageMaker serverless endpoints "
                                 "scale by max_concurrency and have no storage volume); remove it or 'serverless'")
            if self.vpc is not None or self.network_isolation:
                raise ValueError(f"SageMaker serverless endpoints support neither a VPC nor network isolation; "
                                 f"remove '{'vpc' if self.vpc is not None else 'network_isolation'}' or 'serverless'")
            if self.data_capture.enabled:
                raise ValueError("SageMaker serverless endpoints cannot capture data; "
                                 "set data_capture.enabled to false or remove 'serverless'")
            return self
        if self.instance_type is None:
            raise ValueError("set instance_type (e.g. ml.m5.large) or 'serverless'")
        if self.initial_instance_count is None:
            self.initial_instance_count = 1
        scaling = self.autoscaling
        if scaling and not scaling.min_capacity <= self.initial_instance_count <= scaling.max_capacity:
            raise ValueError(f"initial_instance_count ({self.initial_instance_count}) is outside autoscaling's "
                             f"min_capacity..max_capacity ({scaling.min_capacity}..{scaling.max_capacity})")
        return self

    @property
    def is_serverless(self) -> bool:
        return self.serverless is not None

    @property
    def source(self) -> str:
        """The file this stage was read from."""
        return self._source


def stages_dir() -> Path:
    """The shipped stages (``infra/stages/`` in the clone, ``flanops/infra/stages`` when installed)."""
    return Path(str(resources.files("flanops.infra"))) / "stages"


def shipped_stages() -> list[str]:
    return sorted(path.stem for path in stages_dir().glob("*.json"))


def resolve_stage_path(name_or_path: str | Path) -> Path:
    """A path to a JSON file, or a shipped stage's name (``prod`` → ``infra/stages/prod.json``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = stages_dir() / f"{path.name}.json"
    if path.parent == Path(".") and path.suffix == "" and shipped.is_file():
        return shipped
    raise StageConfigError(f"--stage {name_or_path}: no such file; give a JSON file or a shipped stage "
                           f"({', '.join(shipped_stages())})")


def load_stage(name_or_path: str | Path) -> StageConfig:
    """The validated stage config; errors name the file and the field."""
    path = resolve_stage_path(name_or_path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise StageConfigError(f"{path} line {err.lineno} column {err.colno}: not valid JSON ({err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise StageConfigError(f"{path}: cannot read it ({err})") from None
    if not isinstance(raw, dict):
        raise StageConfigError(f"{path}: expected a JSON object of settings, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    return parse_stage(raw, source=str(path))


def parse_stage(raw: dict, source: str = "<memory>") -> StageConfig:
    try:
        stage = StageConfig.model_validate(raw)
    except ValidationError as err:
        raise StageConfigError(f"{source}: " + "; ".join(_describe(error, raw) for error in err.errors())) from None
    stage._source = source
    return stage


# What a field's pattern asks for, in words (pydantic would print the regular expression), by field name.
_PATTERN_HINTS = {
    "instance_type": "a SageMaker instance type such as ml.m5.large",
    "kms_key_id": "a KMS key id, key ARN, alias/NAME or alias ARN",
    "s3_uri": "an s3://bucket/prefix URI",
    "notify_topic_arn": "an SNS topic ARN",
    "subnets": "a subnet id such as subnet-0123456789abcdef0",
    "security_group_ids": "a security group id such as sg-0123456789abcdef0",
}


def pattern_hint(error: dict) -> str | None:
    """What a pydantic pattern error's field wants, in words; None for other errors and unknown fields."""
    names = [part for part in error["loc"] if isinstance(part, str)]   # list positions are ints
    if error["type"] != "string_pattern_mismatch" or not names:
        return None
    hint = _PATTERN_HINTS.get(names[-1])
    return f"expected {hint}" if hint else None


def _describe(error: dict, raw: dict) -> str:
    where = ".".join(str(part) for part in error["loc"])
    message = re.sub(r"^Value error, ", "", error["msg"])
    if where == "name" and "name" in raw and error["type"] == "string_pattern_mismatch":
        message = f"{raw['name']!r} is not a stage name: use letters, digits and single hyphens, starting with a letter"
        return f"name: {message} (set \"name\" or rename the file)"
    message = pattern_hint(error) or message
    given = error.get("input")
    given_text = "" if isinstance(given, dict) or error["type"] == "missing" else f" (given {given!r})"
    return f"{where + ': ' if where else ''}{message}{given_text}"
