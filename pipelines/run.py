"""``flanops run``: the lifecycle's steps in order on this machine, offline by default.

Each step is its own process running the same script SageMaker runs (``steps/<name>.py``),
with paths inside one run folder. This chain covers data → model → LoRA → evaluation; the
SageMaker pipeline definition and its local executor (optimize, gate, register) replace it.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path


@dataclass
class RunSettings:
    """What the quick offline run does; every value has a flag in ``flanops run --help``."""

    output_dir: Path | None = None  # default: runs/<UTC timestamp>
    seed: int = 0
    train_size: int = 2000
    eval_examples: int = 200
    warmup_steps: int = 400
    lora_r: int = 16
    lora_alpha: int = 16
    target_modules: str = "all-linear"  # on a model this small, q,v alone mostly learns the template
    max_steps: int = 300
    learning_rate: float = 5e-3


@dataclass
class StepRecord:
    name: str
    seconds: float
    exit_code: int
    outputs: str


@dataclass
class RunResult:
    run_dir: Path
    steps: list[StepRecord] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        return bool(self.steps) and all(step.exit_code == 0 for step in self.steps)


def steps_dir() -> Path:
    """The step scripts as installed with the package (the same files a job's source_dir holds)."""
    return Path(str(resources.files("flanops.steps")))


def plan(settings: RunSettings, run_dir: Path) -> list[tuple[str, list[str], Path]]:
    data, model, finetuned, evaluation = (run_dir / name for name in ("data", "model", "finetuned", "evaluation"))
    return [
        ("prepare_data", ["--input", "synthetic", "--output-dir", str(data), "--seed", str(settings.seed),
                          "--train-size", str(settings.train_size), "--test-size", str(settings.eval_examples)], data),
        ("select_model", ["--model", "tiny", "--data-dir", str(data), "--output-dir", str(model),
                          "--seed", str(settings.seed), "--warmup-steps", str(settings.warmup_steps)], model),
        ("finetune_lora", ["--model-dir", str(model), "--data-dir", str(data), "--output-dir", str(finetuned),
                           "--checkpoint-dir", str(run_dir / "checkpoints" / "finetune_lora"),
                           "--lora-r", str(settings.lora_r), "--lora-alpha", str(settings.lora_alpha),
                           "--target-modules", settings.target_modules, "--max-steps", str(settings.max_steps),
                           "--learning-rate", str(settings.learning_rate), "--seed", str(settings.seed)], finetuned),
        ("evaluate", ["--model-dir", str(finetuned), "--baseline-dir", str(model), "--data-dir", str(data),
                      "--output-dir", str(evaluation), "--max-examples", str(settings.eval_examples)], evaluation),
    ]


def run(settings: RunSettings, echo=print) -> RunResult:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir = (settings.output_dir or Path("runs") / stamp).absolute()
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SystemExit(f"error: run folder {run_dir} is not empty; choose another --output-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    result = RunResult(run_dir)
    scripts = steps_dir()
    for name, args, output in plan(settings, run_dir):
        echo(f"==> {name}")
        started = time.perf_counter()
        # Unbuffered, inherited stdout/stderr: the step's own progress lines appear live.
        code = subprocess.call([sys.executable, "-u", str(scripts / f"{name}.py"), *args])
        record = StepRecord(name, round(time.perf_counter() - started, 1), code, str(output))
        result.steps.append(record)
        if code != 0:
            echo(f"==> {name} failed (exit {code}); later steps did not run")
            break
    write_summary(result, settings)
    return result


def write_summary(result: RunResult, settings: RunSettings) -> None:
    evaluation_file = result.run_dir / "evaluation" / "evaluation.json"
    evaluation = json.loads(evaluation_file.read_text()) if evaluation_file.is_file() else None
    summary = {
        "run_dir": str(result.run_dir),
        "succeeded": result.succeeded,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(settings).items()},
        "steps": [vars(step) for step in result.steps],
        "metrics": {name: entry["value"] for name, entry in evaluation["metrics"].items()} if evaluation else None,
    }
    (result.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def summary_table(result: RunResult) -> str:
    lines = [f"{'step':<16}{'status':<10}{'seconds':>9}", "-" * 35]
    for step in result.steps:
        lines.append(f"{step.name:<16}{'ok' if step.exit_code == 0 else 'failed':<10}{step.seconds:>9.1f}")
    lines.append(f"{'total':<26}{sum(s.seconds for s in result.steps):>9.1f}")
    return "\n".join(lines)
