"""The wheels a model.tar.gz ships so that its endpoint installs its runtime without network access.

The Hugging Face inference toolkit runs ``pip install -r code/requirements.txt`` when the
container starts. The shipped stages isolate the model container (no network), so a
``ct2-int8`` artifact carries the CTranslate2 wheel in ``code/wheels/`` and its
requirements.txt says ``--no-index --find-links wheels`` (pip reads a relative --find-links in a
requirements file relative to that file): the install never reaches an index. CTranslate2's
own dependencies (numpy, pyyaml) are already in every Hugging Face PyTorch image (transformers
needs them).

The wheel must fit the serving image's Python (``--serving-python``, the registered image's:
3.12) and platform (x86_64 Linux, glibc 2.28 or newer: the images are Ubuntu 22.04). Where it
comes from, first match wins:
  1. ``--wheelhouse DIR`` (the pipeline stages the wheel as the Evaluate job's input, fetched
     once by the flanops client, so the job itself needs no network);
  2. the cache folder (``$FLANOPS_WHEELHOUSE``, default ``~/.cache/flanops/wheels``);
  3. ``pip download`` from the package index into that cache (once per version and Python).
Where none has it and no index is reachable (a laptop gone offline after installing), the flanops
client warns and the artifact is packed without the wheel (``--no-runtime-wheel``): its endpoint
then installs CTranslate2 from the index at start-up, which a network-isolated stage cannot do.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from .errors import StepError, first_line

RUNTIME_PACKAGE = "ctranslate2"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux2014_x86_64")  # what the Ubuntu 22.04 images' pip accepts
DEFAULT_SERVING_PYTHON = "3.12"   # huggingface-pytorch-inference 2.6.0-transformers4.51.3: py312
CACHE_VARIABLE = "FLANOPS_WHEELHOUSE"
WHEELS_DIR = "wheels"             # inside code/ of a model.tar.gz
NO_WHEEL_FLAG = "--no-runtime-wheel"   # evaluate.py: package without it (where it could not be fetched)


def runtime_version() -> str:
    """The installed CTranslate2's version: the artifact's model was converted by it, so it serves it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(RUNTIME_PACKAGE)
    except PackageNotFoundError:
        raise StepError(f"{RUNTIME_PACKAGE} is not installed; pip install {RUNTIME_PACKAGE}") from None


def check_python_version(python: str, flag: str = "--serving-python") -> str:
    if not re.fullmatch(r"3\.\d{1,2}", python):
        raise StepError(f"{flag} {python!r}: expected a Python version such as 3.12 (the serving image's)")
    return python


def wheel_matches(name: str, version: str, python: str) -> bool:
    """``ctranslate2-4.8.5-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl`` for 4.8.5 and 3.12."""
    tag = "cp" + python.replace(".", "")
    return (name.startswith(f"{RUNTIME_PACKAGE}-{version}-{tag}-{tag}-") and name.endswith("x86_64.whl")
            and "manylinux" in name)


def find_wheel(folder: Path, version: str, python: str) -> Path | None:
    if not folder.is_dir():
        return None
    found = sorted(path for path in folder.glob("*.whl") if wheel_matches(path.name, version, python))
    return found[-1] if found else None


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "flanops" / "wheels")


def runtime_wheel(python: str, wheelhouse: str | Path | None = None) -> Path:
    """The CTranslate2 wheel for the serving image's ``python``: from ``wheelhouse``, the cache, or the index."""
    version = runtime_version()
    if wheelhouse is not None:
        wheel = find_wheel(Path(wheelhouse), version, python)
        if wheel is None:
            raise StepError(f"--wheelhouse {wheelhouse}: no {RUNTIME_PACKAGE} {version} wheel for Python {python} on "
                            f"x86_64 Linux; put one there ({download_hint(version, python)})")
        return wheel
    cache = cache_dir() / f"{RUNTIME_PACKAGE}-{version}-py{python}"
    wheel = find_wheel(cache, version, python)
    if wheel is not None:
        return wheel
    print(f"downloading the {RUNTIME_PACKAGE} {version} wheel for Python {python} (x86_64 Linux) to {cache}, once")
    cache.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               *[arg for platform in PLATFORMS for arg in ("--platform", platform)], "--python-version", python,
               "--dest", str(cache), f"{RUNTIME_PACKAGE}=={version}"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheel = find_wheel(cache, version, python)
    if result.returncode != 0 or wheel is None:
        reason = first_line(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no wheel found")
        raise StepError(f"cannot fetch the {RUNTIME_PACKAGE} {version} wheel for Python {python} ({reason}); the "
                        "model's endpoint installs it from the artifact, without network: download it where an index "
                        f"is reachable ({download_hint(version, python, cache)})")
    return wheel


def download_hint(version: str, python: str, into: Path | str = "DIR") -> str:
    platforms = " ".join(f"--platform {platform}" for platform in PLATFORMS)
    return (f"pip download {RUNTIME_PACKAGE}=={version} --no-deps --only-binary=:all: {platforms} "
            f"--python-version {python} -d {into}")


def requirements(wheel: Path | None) -> str:
    """code/requirements.txt of an artifact that ships ``wheel`` in code/wheels/ (None: installed from the index)."""
    if wheel is None:
        return (f"# pip-installed by the Hugging Face inference toolkit when the container starts. No wheel was\n"
                f"# shipped ({NO_WHEEL_FLAG}): this installs from the package index, so the endpoint needs network\n"
                f"# access; a network-isolated stage (the shipped staging and prod) cannot serve this artifact.\n"
                f"{RUNTIME_PACKAGE}=={runtime_version()}\n")
    return (f"# pip-installed by the Hugging Face inference toolkit when the container starts; offline: the\n"
            f"# CTranslate2 wheel ships in {WHEELS_DIR}/ (the shipped stages give the model container no network).\n"
            f"# torch, transformers, tokenizers, numpy and pyyaml come with the image.\n"
            f"--no-index\n--find-links {WHEELS_DIR}\n{RUNTIME_PACKAGE}=={runtime_version()}\n")
