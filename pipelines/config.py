"""Pipeline configuration: defaults → YAML (``configs/*.yaml``) → ``--param NAME=VALUE``.

A config has these parts:

- ``pipeline_name``: the SageMaker pipeline the definition is upserted as.
- ``parameters``: the pipeline's parameters (SageMaker ``Parameters``), named as in the
  definition (``LoraRank``, ``MinRougeL``, …). Their values become the definition's defaults
  and the values an execution starts with.
- ``steps``: each job's fixed settings, as the step script's own flags without the dashes
  (``finetune: {max_steps: 300}`` → ``finetune_lora.py --max-steps 300``). They are baked into
  the definition; the step script's parser checks them, so there is one list of flags.
- ``security`` (optional): a KMS key for the jobs' outputs and volumes (and the buckets flanops
  creates), the VPC the jobs run in, network isolation and inter-container traffic encryption.

``--param`` addresses either a parameter (``LoraRank=8``), a step setting
(``steps.finetune.max_steps=50``) or ``pipeline_name=…``; values are read as YAML scalars.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError
from stepkit.errors import StepError

from flanops.infra.stages import KMS_KEY_PATTERN, Vpc, pattern_hint

from .errors import FlanopsError
from .step_scripts import (import_step, refused_setting, settings_problem, settings_to_flags, step_flags,
                           wired_flag_default)
from .tables import STEPS

OPTIMIZATION_METHODS = ("none", "distill", "quantize", "prune", "auto")
APPROVAL_STATUSES = ("PendingManualApproval", "Approved", "Rejected")
DEFAULT_CONFIG = "quick"

class ConfigError(FlanopsError):
    """A config problem, said so that the user knows what to change and where."""


class Parameters(BaseModel):
    """The pipeline parameters; names and types as they appear in the definition."""

    model_config = ConfigDict(extra="forbid", strict=False)

    InputDataUri: str = Field("synthetic", min_length=1, description=(
        "training data: 'synthetic', an s3:// prefix or file (JSONL/JSON/CSV/Parquet), or a Hugging Face dataset id"))
    BaseModelId: str = Field("tiny", min_length=1, description=(
        "foundation model: 'tiny' (offline stand-in), a catalog name (flan-t5-base) or a hub id"))
    # LoRA's defaults are finetune_lora.py's own (--lora-r, --lora-alpha): the job runs what the script runs alone.
    LoraRank: int = Field(default_factory=lambda: wired_flag_default("LoraRank"), ge=1, le=1024,
                          description="LoRA adapter rank (default: finetune_lora.py's --lora-r)")
    LoraAlpha: int = Field(default_factory=lambda: wired_flag_default("LoraAlpha"), ge=1, le=4096, description=(
        "LoRA scaling numerator, alpha / rank scales the update (default: finetune_lora.py's --lora-alpha)"))
    OptimizationMethod: Literal[OPTIMIZATION_METHODS] = Field("quantize", description=(
        "none, distill, quantize, prune, or auto (all three in parallel; the best variant within the gate wins)"))
    MinRougeL: float = Field(0.40, ge=0.0, le=1.0, description="gate: lowest ROUGE-L F1 (0..1) the registered model may have")
    MaxP95LatencyMs: float = Field(2000.0, gt=0.0, description=(
        "gate: highest p95 latency at batch 1, milliseconds (an absolute SLO: it depends on the machine and its load)"))
    MaxLatencyRatio: float = Field(1.5, gt=0.0, description=(
        "gate: highest batch-1 latency of the registered model over the base model's, timed side by side in the "
        "Evaluate job (a figure the machine's load does not move)"))
    MaxRougeLDrop: float = Field(0.05, ge=0.0, le=1.0, description=(
        "gate and variant choice: largest ROUGE-L F1 loss (0..1) allowed against the fine-tuned model"))
    MinFactAccuracy: float = Field(0.80, ge=0.0, le=1.0, description=(
        "gate: lowest share (0..1) of summaries that state every recorded fact (speakers, day, time, amount …) "
        "right; skipped for data that records no facts (DialogSum)"))
    MaxFactAccuracyDrop: float = Field(0.05, ge=0.0, le=1.0, description=(
        "gate and variant choice: largest loss (0..1) of that share allowed against the fine-tuned model; "
        "skipped for data that records no facts"))
    MaxRepetitionRate: float = Field(0.02, ge=0.0, le=1.0, description=(
        "gate and variant choice: highest share (0..1) of summaries that repeat themselves (a character 4+ times "
        "or a phrase back to back) where no reference does"))
    ModelPackageGroupName: str = Field("flanops", pattern=r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$",
                                       description="Model Registry group the model is registered in")
    ModelApprovalStatus: Literal[APPROVAL_STATUSES] = Field("PendingManualApproval",
                                                            description="approval status of the registered model")
    ProcessingInstanceType: str = Field("ml.m5.xlarge", pattern=r"^ml\.[a-z0-9]+\.[a-z0-9]+$",
                                        description="instance type of the processing jobs")
    TrainingInstanceType: str = Field("ml.g5.xlarge", pattern=r"^ml\.[a-z0-9]+\.[a-z0-9]+$",
                                      description="instance type of the LoRA training job")
    TrainingInstanceCount: int = Field(1, ge=1, le=64, description=(
        "training instances; more than one runs torchrun across them (SageMaker distributed training)"))

    @field_validator("BaseModelId")
    @classmethod
    def _a_model_select_model_takes(cls, value: str) -> str:
        """Checked as select_model.py checks its --model, so a typo fails now and not at the SelectModel job."""
        select_model = import_step("select_model")
        try:
            select_model.resolve_source(value, random_weights=False, flag="")
        except StepError as err:  # the message names the value; the error's location names BaseModelId
            raise PydanticCustomError("unknown_model", str(err).strip().replace("{", "{{").replace("}", "}}")) from None
        return value


class Images(BaseModel):
    """Hugging Face container versions (``sagemaker.core.image_uris.retrieve('huggingface', …)``)."""

    model_config = ConfigDict(extra="forbid")

    training_transformers: str = "5.3.0"
    training_pytorch: str = "2.9.0"
    processing_transformers: str = "5.5.3"   # CPU inference image: our processing jobs need no GPU
    processing_pytorch: str = "2.6.0"
    inference_transformers: str = "4.51.3"   # the 4.x hosting images most users still run
    inference_pytorch: str = "2.6.0"
    inference_instance_types: list[str] = ["ml.m5.xlarge", "ml.c5.xlarge", "ml.g5.xlarge"]


class Security(BaseModel):
    """Encryption and networking of the pipeline's jobs; everything off unless set."""

    model_config = ConfigDict(extra="forbid")

    kms_key_id: str | None = Field(None, pattern=KMS_KEY_PATTERN, description=(
        "KMS key for the jobs' outputs and storage volumes, and the default encryption of buckets flanops creates"))
    vpc: Vpc | None = Field(None, description="run the jobs in these subnets and security groups")
    network_isolation: bool = Field(False, description=(
        "the job containers get no network at all (not even S3): data and model must come through their inputs"))
    encrypt_inter_container_traffic: bool = Field(False, description=(
        "encrypt traffic between the instances of a distributed job (slower)"))


class ConfigFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pipeline_name: str = Field("flanops", pattern=r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,255}$")
    parameters: Parameters = Field(default_factory=Parameters)   # built when needed: its defaults read step scripts
    steps: dict[str, dict[str, Any]] = {}
    images: Images = Images()
    cache_expire_after: str = Field("P30D", pattern=r"^P(\d+[YMWD])*(T(\d+[HMS])+)?$")
    max_retries: int = Field(1, ge=0, le=10)
    security: Security = Security()


@dataclass
class PipelineConfig:
    """A validated config and where it came from."""

    pipeline_name: str
    parameters: Parameters
    steps: dict[str, dict[str, Any]]
    images: Images
    cache_expire_after: str
    max_retries: int
    source: str = "defaults"
    overrides: list[str] = field(default_factory=list)
    security: Security = field(default_factory=Security)

    @property
    def label(self) -> str:
        """How messages name the config: a shipped one as ``configs/quick.yaml``, never its installed path."""
        return config_label(Path(self.source))

    def step_arguments(self, section: str) -> list[str]:
        """The ``steps.<section>`` settings as the step script's command-line flags."""
        return settings_to_flags(self.steps.get(section, {}), step_flags(section) if section in STEPS else set())

    def parameter_values(self) -> dict[str, Any]:
        return self.parameters.model_dump()


def config_dir() -> Path:
    """The shipped configs (``configs/`` in the clone, ``flanops/configs`` when installed)."""
    return Path(str(resources.files("flanops.configs")))


def shipped_configs() -> list[Path]:
    return sorted(config_dir().glob("*.yaml"))


def config_label(path: Path) -> str:
    """``configs/<name>.yaml`` for a shipped config (installed under site-packages), else the path as given."""
    if path.parent.resolve() == config_dir().resolve() and path.suffix == ".yaml":
        return f"configs/{path.name}"
    return str(path)


def closest(name: str, choices: list[str]) -> str | None:
    """The choice ``name`` is most likely a typo of, ignoring case and underscores (LoraRnak → LoraRank)."""
    def key(text: str) -> str:
        return text.lower().replace("_", "")

    keyed = {key(choice): choice for choice in choices}
    match = difflib.get_close_matches(key(name), list(keyed), n=1)
    return keyed[match[0]] if match else None


def resolve_config_path(name_or_path: str | Path | None) -> Path:
    """A path, or the name of a shipped config (``quick`` → ``configs/quick.yaml``)."""
    if name_or_path is None:
        name_or_path = DEFAULT_CONFIG
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = config_dir() / f"{path.stem if path.suffix in ('.yaml', '.yml') else path.name}.yaml"
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    names = ", ".join(p.stem for p in shipped_configs())
    raise ConfigError(f"--config {name_or_path}: no such file; give a YAML path or a shipped config ({names})")


def load_config(name_or_path: str | Path | None = None,
                params: Mapping[str, Any] | Iterable[str] | None = None) -> PipelineConfig:
    """Defaults, then the YAML file, then each override; validated as a whole.

    ``params``: typed values by name (``{"LoraRank": 8, "steps.finetune.max_steps": 50}``, as Python callers
    give them) or ``NAME=VALUE`` texts (as ``--param`` takes them; the value is read as a YAML scalar).
    """
    path = resolve_config_path(name_or_path)
    label = config_label(path)
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{label}: not UTF-8 text (byte 0x{err.object[err.start]:02x}); save it as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{label}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: expected a mapping of settings at the top level, got {type(raw).__name__}")
    values = dict(params) if isinstance(params, Mapping) else dict(parse_param(spec) for spec in params or [])
    # as messages show them: the texts given, or name=value
    overrides = [f"{name}={value}" for name, value in values.items()] if isinstance(params, Mapping) \
        else list(params or [])
    for name, value in values.items():
        apply_override(raw, name, value)
    try:
        parsed = ConfigFile.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{label}{' with --param ' + ' '.join(overrides) if overrides else ''}: "
                          + "; ".join(describe_error(e) + error_context(e, None if overrides else text)
                                      for e in err.errors())) from None
    config = PipelineConfig(parsed.pipeline_name, parsed.parameters, parsed.steps, parsed.images,
                            parsed.cache_expire_after, parsed.max_retries, source=str(path), overrides=overrides,
                            security=parsed.security)
    check_step_settings(config, text)
    check_network_isolation(config)
    return config


def parse_param(spec: str) -> tuple[str, Any]:
    """``NAME=VALUE`` (one ``--param``) → (name, the value read as a YAML scalar)."""
    name, sep, text = spec.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ConfigError(f"--param {spec!r}: expected NAME=VALUE, e.g. --param LoraRank=8")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return name, value


def apply_override(raw: dict, name: str, value: Any) -> None:
    if name in Parameters.model_fields:
        raw.setdefault("parameters", {})
        if not isinstance(raw["parameters"], dict):
            raise ConfigError("'parameters' in the config must be a mapping")
        raw["parameters"][name] = value
    elif name.startswith("steps.") and name.count(".") == 2:
        _, section, setting = name.split(".")
        if section not in STEPS:
            close = closest(section, list(STEPS))
            raise ConfigError(f"--param {name}: unknown step {section!r}{f' (did you mean {close}?)' if close else ''}; "
                              f"steps are {', '.join(STEPS)}")
        raw.setdefault("steps", {}).setdefault(section, {})[setting] = value
    elif name in ("pipeline_name", "cache_expire_after", "max_retries"):
        raw[name] = value
    else:
        close = closest(name, list(Parameters.model_fields))
        hint = f" (did you mean {close}?)" if close else ""
        raise ConfigError(f"--param {name}: unknown parameter{hint}; parameters are "
                          f"{', '.join(Parameters.model_fields)}, or steps.<step>.<setting>, pipeline_name")


def describe_error(error: dict) -> str:
    where = ".".join(str(part) for part in error["loc"])
    given = error.get("input")
    given_text = "" if isinstance(given, dict) else f" (given {given!r})"
    return f"{where}: {pattern_hint(error) or error['msg']}{given_text}"


def check_network_isolation(config: PipelineConfig) -> None:
    """Isolated jobs have no network, so no step script may have to fetch its data or base model itself."""
    if not config.security.network_isolation:
        return
    values = config.parameter_values()
    fetched = []
    if values["InputDataUri"] != "synthetic":
        fetched.append(f"InputDataUri {values['InputDataUri']!r} (prepare_data.py reads it from S3 or the Hub)")
    if values["BaseModelId"] != "tiny" and not config.steps.get("select", {}).get("random_weights"):
        fetched.append(f"BaseModelId {values['BaseModelId']!r} (select_model.py downloads it)")
    if fetched:
        raise ConfigError(f"{config.label}: security.network_isolation leaves the jobs without network access, "
                          f"but they would fetch {' and '.join(fetched)}; turn network_isolation off, or use "
                          "InputDataUri=synthetic and BaseModelId=tiny")


def check_step_settings(config: PipelineConfig, text: str | None = None) -> None:
    """Each ``steps.<section>`` setting is exactly a flag its script has, of the right type.

    The script's own argparse parser decides, so a config cannot drift from the scripts. ``text``
    (the YAML) lets a message give the line of a setting that came from the file.
    """
    unknown = set(config.steps) - set(STEPS)
    if unknown:
        section = sorted(unknown)[0]
        close = closest(section, list(STEPS))
        raise ConfigError(f"{config.label}: steps.{section}: unknown step{f' (did you mean {close}?)' if close else ''}; "
                          f"steps are {', '.join(STEPS)}")
    overridden = {spec.partition("=")[0].strip() for spec in config.overrides}
    for section, settings in config.steps.items():
        if not isinstance(settings, dict):
            raise ConfigError(f"{config.label}: steps.{section} must be a mapping of flag: value")
        step = STEPS[section]
        script = step.script
        flags = step_flags(section)
        for name in settings:
            where = setting_origin(config, f"steps.{section}.{name}", overridden, text)
            if not re.fullmatch(r"[a-z][a-z0-9_]*", str(name)) or name == "help":
                raise ConfigError(f"{where}: settings are flag names like max_steps")
            refusal = refused_setting(step, name)
            if refusal:
                raise ConfigError(f"{where}: {refusal}")
            if name not in flags:
                close = closest(name, sorted(flags - step.wired() - set(step.refused)))
                hint = f"did you mean {close}? " if close else ""
                raise ConfigError(f"{where}: {script}.py has no flag --{name.replace('_', '-')}; {hint}"
                                  f"settings are its flags without the dashes (python steps/{script}.py --help)")
        problem = settings_problem(section, settings_to_flags(settings, flags))
        if problem:
            given = [spec for spec in config.overrides if spec.startswith(f"steps.{section}.")]
            raise ConfigError(f"{config.label}{' with --param ' + ' '.join(given) if given else ''}: "
                              f"steps.{section} ({script}.py): {problem}")


def setting_origin(config: PipelineConfig, name: str, overridden: set[str], text: str | None) -> str:
    """Where a step setting was given: ``--param steps.x.y`` or ``configs/x.yaml line 4: steps.x.y``."""
    if name in overridden:
        return f"--param {name}"
    line = yaml_line(text, name.split(".")) if text else None
    return f"{config.label}{f' line {line}' if line else ''}: {name}"


def error_context(error: dict, text: str | None) -> str:
    """Where a validation error is in the YAML ``text`` (its line), and for an unknown key what is allowed there."""
    loc = [str(part) for part in error["loc"]]
    context = ""
    line = yaml_line(text, loc) if text else None
    if line:
        context += f" at line {line}"
    allowed = allowed_keys(loc[:-1]) if error["type"] == "extra_forbidden" else []
    if allowed:
        close = closest(loc[-1], allowed)
        hint = f"did you mean {close}? " if close else ""
        context += f"; {hint}allowed here: {', '.join(allowed)}"
    return context


def yaml_line(text: str, loc: list[str]) -> int | None:
    """The line of the deepest key of ``loc`` that the YAML ``text`` holds (None if it holds none)."""
    node, line = yaml.compose(text), None
    for part in loc:
        pairs = node.value if isinstance(node, yaml.MappingNode) else []
        match = next(((key, value) for key, value in pairs if key.value == part), None)
        if match is None:
            break
        line, node = match[0].start_mark.line + 1, match[1]
    return line


def allowed_keys(path: list[str]) -> list[str]:
    """The settings a config may have at ``path`` (``[]``: top level, ``["parameters"]`` …); [] if it takes any."""
    model: type[BaseModel] | None = ConfigFile
    for part in path:
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        model = next((kind for kind in (annotation, *get_args(annotation))
                      if isinstance(kind, type) and issubclass(kind, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


# Gate thresholds no model passes (see gate_warnings).
UNREACHABLE_ROUGE_L = 0.95      # ROUGE-L F1 of near word-for-word agreement with the references
UNREACHABLE_LATENCY_MS = 1.0    # one summary at batch 1: generate() alone takes longer


def gate_warnings(config: PipelineConfig) -> list[str]:
    """Gate thresholds that no model can pass, or that throw the chosen optimization away.

    Warned before a run starts, not refused: a gate that fails on purpose (to try the FailStep)
    is a legitimate run.
    """
    values = config.parameter_values()
    method = values["OptimizationMethod"]
    warnings = []
    if values["MinRougeL"] >= UNREACHABLE_ROUGE_L:
        warnings.append(f"MinRougeL {values['MinRougeL']:g}: ROUGE-L F1 of {UNREACHABLE_ROUGE_L:g} or more means "
                        "near word-for-word agreement with the reference summaries, which no summarizer reaches "
                        "(fine-tuned Flan-T5-base: about 0.4 on DialogSum; the quick config's tiny model: about 0.64 "
                        "on synthetic data); the gate will fail. Lower it (quick: 0.40, cloud: 0.30)")
    if values["MaxP95LatencyMs"] < UNREACHABLE_LATENCY_MS:
        warnings.append(f"MaxP95LatencyMs {values['MaxP95LatencyMs']:g}: the p95 latency is that of a whole summary "
                        f"at batch 1, and generating one takes more than {UNREACHABLE_LATENCY_MS:g} ms with any model; "
                        "the gate will fail. Raise it (quick: 5000, cloud: 1500)")
    if values["MaxRougeLDrop"] == 0 and method != "none":
        warnings.append(f"MaxRougeLDrop 0 with OptimizationMethod {method}: an optimized variant is chosen only if it "
                        "loses no ROUGE-L at all, which distillation, quantization and pruning almost never manage, so "
                        "the fine-tuned model will be registered and the optimization wasted. Allow a small drop "
                        "(e.g. 0.02) or set OptimizationMethod none")
    return warnings
