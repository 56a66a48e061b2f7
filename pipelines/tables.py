"""The tables the pipeline is made from: its steps (:data:`STEPS`) and its quality gate (:data:`GATE`).

A new job step is a row of STEPS (and its script in ``steps/``); a new gate condition is a row of GATE
(and its parameter in config.Parameters, its metric in evaluate.py's evaluation.json). The definition,
the config checks, the CLI's help, the run summary and the report all read them from here. No imports
from the rest of the package: every module may import this one.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GateCondition:
    """One condition of the quality gate: evaluation.json's ``metrics.<metric>.value`` against a parameter."""

    metric: str
    parameter: str
    at_least: bool          # True: measured >= threshold; False: measured <= threshold
    label: str              # as people read it in the summary, the FailStep's message and the report
    unit: str = ""
    # A metric of evaluation.json (1 or 0) that says whether this condition applies; where it is 0 the
    # condition holds (skipped) and ``metrics.<applies_when>.note`` says why.
    applies_when: str | None = None
    # The evaluate.py flag that gives this threshold to the variant choice too (a variant that would fail it
    # is not chosen), wired by the definition from the same parameter.
    selects: str | None = None

    def passed(self, measured: float, threshold: float) -> bool:
        return measured >= threshold if self.at_least else measured <= threshold

    def bound(self) -> str:
        return "min" if self.at_least else "max"


# The gate, in one place: the definition's ConditionStep, FailStep message and the variant choice's flags, the
# run summary and the report (its tables and chart) are all made from this table. Each parameter is a field of
# Parameters below.
GATE = (
    GateCondition("rougeL", "MinRougeL", True, "ROUGE-L"),
    GateCondition("latency_p95_ms", "MaxP95LatencyMs", False, "p95 latency", " ms"),
    GateCondition("latency_ratio", "MaxLatencyRatio", False, "latency vs the base model", "x"),
    GateCondition("rougeL_drop", "MaxRougeLDrop", False, "ROUGE-L drop vs fine-tuned", selects="select_within_drop"),
    GateCondition("facts_all_right", "MinFactAccuracy", True, "all facts right", applies_when="facts_recorded"),
    GateCondition("facts_all_right_drop", "MaxFactAccuracyDrop", False, "all-facts-right drop vs fine-tuned",
                  applies_when="facts_recorded", selects="select_max_fact_drop"),
    GateCondition("repetition_rate", "MaxRepetitionRate", False, "repeating summaries",
                  selects="select_max_repetition"),
)


@dataclass(frozen=True)
class Step:
    """One job of the pipeline: the config section of its settings, the script whose flags they are, its step name.

    ``passed``: the flags the definition passes itself, in the order it passes them, each with where its value
    comes from (a parameter's name is given as ``parameter X``). ``container``: path flags whose defaults the
    job's container sets (SM_CHANNEL_*, SM_MODEL_DIR). ``refused``: other flags a config may not set, and why.
    A config's ``steps.<section>`` may set every other flag of the script; the script's own defaults apply to
    what it leaves out, so the defaults live in the script's parser.
    """

    section: str
    script: str
    name: str
    passed: dict[str, str]
    container: tuple[str, ...] = ()
    refused: dict[str, str] = field(default_factory=dict)
    entry: str | None = None          # the job's entry script where it is not ``script`` (optimize.py runs it)

    def wired(self) -> set[str]:
        """The flags the pipeline sets, so a config may not."""
        return {*self.passed, *self.container}

    def parameter_of(self, flag: str) -> str | None:
        """The pipeline parameter a wired flag's value comes from, if one does."""
        source = self.passed.get(flag, "")
        return source.split(" ", 1)[1] if source.startswith("parameter ") else None


# A job's output folder starts empty (SageMaker's, and the local executor's fresh sandbox): nothing to overwrite.
NOTHING_TO_OVERWRITE = {"overwrite": "each job's output folder starts empty, so there is nothing to overwrite"}
PROCESSING_CHECKPOINTS = ("a processing job has no checkpoint location (SageMaker syncs checkpoints for training "
                          "jobs only), so its checkpoints would be lost with the job")
OPTIMIZED_INPUTS = {"data_dir": "PrepareData's output", "output_dir": "the job's output folder"}

STEPS = {step.section: step for step in (
    Step("prepare", "prepare_data", "PrepareData",
         {"input": "parameter InputDataUri", "output_dir": "the job's output folder"}, refused=NOTHING_TO_OVERWRITE),
    Step("select", "select_model", "SelectModel",
         {"model": "parameter BaseModelId", "output_dir": "the job's output folder"},
         refused={**NOTHING_TO_OVERWRITE, "dry_run": "with it the job writes no model, which the next steps need",
                  "list": "with it the job prints its catalog and writes no model, which the next steps need"}),
    Step("finetune", "finetune_lora", "FineTuneLoRA",
         {"lora_r": "parameter LoraRank", "lora_alpha": "parameter LoraAlpha",
          "checkpoint_dir": "the job's checkpoint location (synced with S3, so a retried job resumes)"},
         container=("model_dir", "data_dir", "output_dir"), refused=NOTHING_TO_OVERWRITE),
    Step("distill", "distill", "OptimizeDistill", {"teacher_dir": "FineTuneLoRA's model", **OPTIMIZED_INPUTS},
         refused={**NOTHING_TO_OVERWRITE, "checkpoint_dir": PROCESSING_CHECKPOINTS}, entry="optimize"),
    Step("quantize", "quantize", "OptimizeQuantize", {"model_dir": "FineTuneLoRA's model", **OPTIMIZED_INPUTS},
         refused=NOTHING_TO_OVERWRITE, entry="optimize"),
    Step("prune", "prune", "OptimizePrune", {"model_dir": "FineTuneLoRA's model", **OPTIMIZED_INPUTS},
         refused=NOTHING_TO_OVERWRITE, entry="optimize"),
    Step("evaluate", "evaluate", "Evaluate",
         {"model_dir": "FineTuneLoRA's model", "baseline_dir": "SelectModel's model", "data_dir": "PrepareData's output",
          "output_dir": "the job's output folder", "package_dir": "the job's output folder",
          **{c.selects: f"parameter {c.parameter}" for c in GATE if c.selects},
          "serving_python": "the inference image's Python", "wheelhouse": "the serving runtime's wheel, staged in S3",
          "no_runtime_wheel": "whether that wheel could be fetched", "compare": "the Optimize steps' models"},
         refused=NOTHING_TO_OVERWRITE),
)}
