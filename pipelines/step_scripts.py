"""The step scripts as the client sees them: their folder, their modules, their flags and the checks they run
on a config's settings before anything starts (the scripts' own parsers decide, so nothing can drift)."""
from __future__ import annotations

import contextlib
import importlib
import io
from importlib import resources
from pathlib import Path
from typing import Any

from stepkit.errors import StepError

from .tables import STEPS


def settings_to_flags(settings: dict[str, Any], known: set[str] = frozenset()) -> list[str]:
    """Settings as flags: ``true`` gives the bare flag; ``false`` gives ``--no-<name>`` where the script has
    one (``gradient_checkpointing: false``), else nothing (the flag's default is off)."""
    flags: list[str] = []
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False and f"no_{name}" in known:
            flags.append("--no-" + name.replace("_", "-"))
        elif value is False or value is None:
            continue
        else:
            flags += [flag, str(value)]
    return flags


def steps_dir() -> Path:
    """The step scripts as installed with the package: the folder each job gets as its source_dir."""
    return Path(str(resources.files("flanops.steps")))


def import_step(script: str):
    """A step script as a module: ``flanops.steps.<script>``; its ``stepkit`` is the installed top-level one."""
    return importlib.import_module(f"flanops.steps.{script}")


def wired_flag_default(parameter: str) -> Any:
    """The default of a parameter that feeds a step script's flag: that flag's own default in the script."""
    section, flag = next((step.section, flag) for step in STEPS.values() for flag in step.passed
                         if step.parameter_of(flag) == parameter)
    return import_step(STEPS[section].script).build_parser().get_default(flag)


def refused_setting(step, name: str) -> str | None:
    """Why a config may not set flag ``name`` of ``step``'s script (None: it may)."""
    if name in step.wired():
        parameter = step.parameter_of(name)
        source = step.passed.get(name, "the job's container")
        return (f"set by the pipeline itself, from {source}" +
                (f"; set it with --param {parameter}=… (or parameters.{parameter})" if parameter else "; remove it"))
    if name in step.refused:
        return f"not a setting of the pipeline's {step.name} job: {step.refused[name]}; remove it"
    return None


def step_flags(section: str) -> set[str]:
    """The long flags of a section's script, as settings (``--max-steps`` → ``max_steps``); ``help`` is none."""
    parser = import_step(STEPS[section].script).build_parser()
    # argparse has no public list of a parser's actions; _actions has been the one place since Python 3.2.
    return {option[2:].replace("-", "_") for action in parser._actions for option in action.option_strings
            if option.startswith("--") and option != "--help"}


def settings_problem(section: str, flags: list[str]) -> str | None:
    """What the step script says about ``flags``, or None if it accepts them.

    First its argparse parser, then its ``check_flags`` (the checks that need no file: a
    temperature, a pruning amount, a LoRA rank), so a value that would stop the job hours into
    a run stops the config now. Folders the pipeline wires get a stand-in: check_flags only
    looks at whether they are given.
    """
    module = import_step(STEPS[section].script)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            args = module.parse_args(flags)
    except SystemExit:
        lines = [line for line in captured.getvalue().splitlines() if "error:" in line]
        message = lines[-1].split("error:", 1)[1].strip() if lines else captured.getvalue().strip()
        return message.replace("unrecognized arguments", "unknown setting(s)")
    for name in STEPS[section].wired():
        if name.endswith("_dir") and getattr(args, name, None) is None:
            setattr(args, name, f"<{name} from the pipeline>")
    try:
        if hasattr(module, "check_flags"):
            module.check_flags(args)
    except StepError as err:
        return str(err)
    return None
