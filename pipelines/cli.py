"""flanops: Flan-T5 through its whole lifecycle as one SageMaker pipeline.

Commands import their heavy dependencies lazily so that ``flanops --help`` stays fast.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_run(commands) -> None:
    from .run import RunSettings

    defaults = RunSettings()
    run = commands.add_parser("run", help="run the lifecycle offline: data → tiny model → LoRA → evaluation",
                              description="Run prepare_data → select_model (tiny) → finetune_lora → evaluate "
                                          "on this machine, offline, into one run folder.")
    run.add_argument("--output-dir", type=Path, help="run folder (default: runs/<UTC timestamp>)")
    run.add_argument("--seed", type=int, default=defaults.seed)
    run.add_argument("--train-size", type=int, default=defaults.train_size, help="synthetic training examples")
    run.add_argument("--eval-examples", type=int, default=defaults.eval_examples, help="test examples scored")
    run.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps, help="tiny model warm-up steps")
    run.add_argument("--lora-r", type=int, default=defaults.lora_r)
    run.add_argument("--lora-alpha", type=int, default=defaults.lora_alpha)
    run.add_argument("--target-modules", default=defaults.target_modules)
    run.add_argument("--max-steps", type=int, default=defaults.max_steps, help="LoRA fine-tune steps")
    run.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="LoRA learning rate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flanops", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_run(commands)
    args = parser.parse_args(argv)

    if args.command == "run":
        from .run import RunSettings, run, summary_table

        settings = RunSettings(**{k: v for k, v in vars(args).items() if k != "command"})
        result = run(settings)
        print()
        print(summary_table(result))
        print(f"\nrun folder: {result.run_dir} (summary.json, evaluation/evaluation.json, evaluation/predictions.jsonl)")
        return 0 if result.succeeded else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
