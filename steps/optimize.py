"""One entry script for the pipeline's three parallel optimization branches: distill, quantize, prune.

The pipeline starts this script once per --variant, all with the same --method (a pipeline
parameter), and passes each branch its step's own arguments after ``--``:

  --method is the variant, or auto   run that step (distill.py, quantize.py or prune.py) in this
                                     process with the arguments after --, as if it were started itself
  any other --method (none too)      run nothing: write SKIPPED.json ({"variant", "method", "reason"})
                                     and _SUCCESS to the step's --output-dir and exit 0, so a branch
                                     that was not chosen costs seconds; evaluate.py drops such folders

--output-dir is read from the arguments after -- (default: the step's own, e.g. $SM_MODEL_DIR),
so a skipped branch writes where the step would have, which is the folder SageMaker uploads.

Example:
  python steps/optimize.py --variant quantize --method auto -- \\
      --model-dir out/finetuned --method ct2-int8 --output-dir out/quantized
  python steps/optimize.py --variant prune --method quantize -- \\
      --model-dir out/finetuned --method structured --amount 0.5 --output-dir out/pruned   # skipped
"""
from __future__ import annotations

import argparse
import importlib
import sys

from stepkit.contract import SKIPPED_MARKER, atomic_output_dir, env_path, require_output_dir, write_skipped
from stepkit.errors import StepError, run_step

VARIANTS = ("distill", "quantize", "prune")  # = the step scripts' module names
METHODS = ("none", *VARIANTS, "auto")


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this script's arguments, the step's arguments): split at the first ``--``."""
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return argv, []


def parse_args(own: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s --variant VARIANT --method METHOD -- [step arguments]",
                                     allow_abbrev=False)
    parser.add_argument("--variant", required=True, help=f"this branch: {', '.join(VARIANTS)}")
    parser.add_argument("--method", required=True,
                        help=f"the chosen optimization: {', '.join(METHODS)}; the branch runs when it is its variant or auto")
    args, unknown = parser.parse_known_args(own)
    if unknown:  # the step's --method would clash with ours: its arguments must come after --
        raise StepError(f"unrecognized arguments {' '.join(unknown)}; arguments for the {args.variant} step go after "
                        f"--, e.g. optimize.py --variant {args.variant} --method auto -- --model-dir ... --output-dir ...")
    if args.variant not in VARIANTS:
        raise StepError(f"--variant {args.variant!r} is not known; choose one of {', '.join(VARIANTS)}")
    if args.method not in METHODS:
        raise StepError(f"--method {args.method!r} is not known; choose one of {', '.join(METHODS)} "
                        f"(auto runs every branch and lets evaluate.py choose)")
    return args


def skip_reason(variant: str, method: str) -> str | None:
    """Why this branch does nothing, or None when it runs."""
    if method in (variant, "auto"):
        return None
    if method == "none":
        return "--method none: no optimization was chosen"
    return f"--method {method} chose the {method} branch, not {variant}"


def write_skipped_output(step, variant: str, method: str, reason: str, step_argv: list[str]) -> None:
    """SKIPPED.json and _SUCCESS where ``step`` would have written its model (its --output-dir or env default)."""
    # Only the two flags that say where; the rest is the step's (which refuses abbreviations too).
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--output-dir", default=env_path(*step.OUTPUT_ENV))
    parser.add_argument("--overwrite", action="store_true")
    known, _ = parser.parse_known_args(step_argv)
    output_dir = require_output_dir(known.output_dir, "--output-dir (after --)", known.overwrite, *step.OUTPUT_ENV)
    with atomic_output_dir(output_dir, known.overwrite) as staging:
        write_skipped(staging, variant, method, reason)
    print(f"skipped {variant}: {reason}; wrote {SKIPPED_MARKER} to {output_dir}")


def branch_script(variant: str):
    """distill.py, quantize.py or prune.py beside this script, under the one name it has in this process:
    its bare name when this runs as a script (the folder is sys.path[0], as in the job's container), else
    this package's (``flanops.steps.quantize`` when flanops imports ``flanops.steps.optimize``)."""
    return importlib.import_module(f"{__package__}.{variant}" if __package__ else variant)


def main(argv: list[str] | None = None) -> int:
    own, step_argv = split_argv(list(sys.argv[1:] if argv is None else argv))
    args = parse_args(own)
    step = branch_script(args.variant)
    reason = skip_reason(args.variant, args.method)
    if reason:
        write_skipped_output(step, args.variant, args.method, reason, step_argv)
        return 0
    print(f"optimize: running {args.variant} (--method {args.method})")
    return step.main(step_argv) or 0


if __name__ == "__main__":
    sys.exit(run_step(main))
