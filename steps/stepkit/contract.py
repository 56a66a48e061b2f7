"""The SageMaker container contract: where a job's paths come from, and how outputs are published.

Paths default from the ``SM_*`` environment that SageMaker sets in training containers; for
processing jobs the pipeline definition passes ``/opt/ml/processing/...`` as arguments. A
path is never taken from a constant in a step's logic.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from .archive import MODEL_ARCHIVE, extract_model_archive
from .errors import StepError, storage_problem

COMPLETE_MARKER = "_SUCCESS"
SKIPPED_MARKER = "SKIPPED.json"  # an optimization branch that was not chosen (optimize.py): no model inside


def env_path(*env_vars: str) -> str | None:
    """The first of ``env_vars`` that is set, e.g. ``env_path("SM_CHANNEL_TRAIN")``; else None.

    Used as an argparse default, so that ``--help`` shows where a path comes from and a
    missing one becomes a clear 'required' error instead of a guess.
    """
    for name in env_vars:
        value = os.environ.get(name)
        if value:
            return value
    return None


def path_help(text: str, *env_vars: str) -> str:
    return f"{text} (default: ${' or $'.join(env_vars)})" if env_vars else text


def require_path(value: str | None, flag: str, *env_vars: str) -> Path:
    if not value:
        hint = f" or set {' / '.join(env_vars)}" if env_vars else ""
        raise StepError(f"{flag} is required{hint}")
    return Path(value)


def check_output_target(target: Path, overwrite: bool, flag: str = "--output-dir") -> None:
    """A user's non-empty folder is never replaced unless they said so (SageMaker's empty ones are fine)."""
    if target.exists() and not target.is_dir():
        raise StepError(f"output {target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise StepError(
            f"output folder {target} is not empty; choose another {flag} or pass --overwrite"
        )


def require_output_dir(value: str | None, flag: str, overwrite: bool, *env_vars: str) -> Path:
    """``require_path`` for an output folder, checked before any work so a full folder fails in seconds."""
    target = require_path(value, flag, *env_vars)
    check_output_target(target.absolute(), overwrite, flag)
    return target


def is_complete(folder: str | Path) -> bool:
    """True when a step published this folder completely (see :func:`atomic_output_dir`)."""
    return (Path(folder) / COMPLETE_MARKER).is_file()


def ensure_input_dir(folder: str | Path, flag: str, must_contain: tuple[str, ...] = ()) -> Path:
    """Check that an input folder exists and holds what the step needs, or say what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StepError(f"{flag} {folder}: no such folder")
    missing = [name for name in must_contain if not (folder / name).exists()]
    if missing:
        raise StepError(
            f"{flag} {folder}: missing {', '.join(missing)}; "
            "is this the output folder of the step that makes it?"
        )
    return folder


def write_skipped(folder: str | Path, variant: str, method: str, reason: str) -> None:
    """Mark ``folder`` as the output of an optimization branch that was not run (read by :func:`skipped_reason`)."""
    record = {"variant": variant, "method": method, "reason": reason}
    (Path(folder) / SKIPPED_MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def skipped_reason(folder: str | Path) -> str | None:
    """Why the step that wrote ``folder`` skipped its work (its SKIPPED.json), or None for a real output.

    Also looks inside a ``model.tar.gz`` (no config.json beside it): a TrainingStep's output
    reaches later jobs packed. The extraction is cached, so loading the model afterwards costs nothing more.
    """
    folder = Path(folder)
    marker = folder / SKIPPED_MARKER
    archive = folder / MODEL_ARCHIVE
    if not marker.is_file() and not (folder / "config.json").is_file() and archive.is_file():
        marker = extract_model_archive(archive, str(archive)) / SKIPPED_MARKER
    if not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StepError(f"{folder}: {SKIPPED_MARKER} is not valid JSON ({err}); was it written by optimize.py?") from None
    reason = record.get("reason") if isinstance(record, dict) else None
    return str(reason or f"{SKIPPED_MARKER} gives no reason")


@contextlib.contextmanager
def atomic_output_dir(target: str | Path, overwrite: bool = False, flag: str = "--output-dir") -> Iterator[Path]:
    """Yield a staging folder; publish it as ``target`` only if the block finishes.

    The staging folder is a sibling of ``target`` (same file system, so publishing is a
    rename). A crash or Ctrl-C leaves ``target`` untouched and removes the staging folder; a
    SIGKILL can leave only a hidden ``.<name>.partial-*`` folder, never a ``target`` that
    looks complete. ``_SUCCESS`` is written last, so readers can tell a finished folder.

    An existing non-empty ``target`` is never deleted unless ``overwrite`` is set (SageMaker
    pre-creates empty output folders, which are fine).
    """
    target = Path(target).absolute()
    check_output_target(target, overwrite, flag)  # again: the folder may have filled up while the step worked
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
    except OSError as err:
        raise StepError(f"cannot create output folder next to {target}: {err.strerror}") from err
    try:
        yield staging
        (staging / COMPLETE_MARKER).write_text("")
        _publish(staging, target)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        problem = storage_problem(err)
        if problem:
            raise StepError(f"writing {target}: {problem}; nothing was published and the partial output was "
                            f"removed. Free space there or choose another {flag}, then run again") from None
        raise


def _publish(staging: Path, target: Path) -> None:
    if target.is_dir() and any(target.iterdir()):  # overwrite: keep the old one until the swap
        retired = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, retired)
        os.rename(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
        return
    try:
        os.replace(staging, target)  # replaces an empty folder atomically
    except OSError:
        # target is a mount point (as /opt/ml/model can be): move entries in, marker last.
        entries = sorted(staging.iterdir(), key=lambda p: p.name == COMPLETE_MARKER)
        for entry in entries:
            os.replace(entry, target / entry.name)
        staging.rmdir()
