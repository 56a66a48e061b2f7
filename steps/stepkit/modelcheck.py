"""Is this folder a whole, readable T5-family model? Checks that fail in milliseconds with a clear error,
before loading fails deep inside transformers."""
from __future__ import annotations

import json
from pathlib import Path

from .archive import MODEL_ARCHIVE, extract_model_archive, find_model_root
from .ctranslate import RUNTIME_DIR, RUNTIME_FILES
from .errors import StepError, first_line

SUPPORTED_MODEL_TYPES = ("t5",)


def check_model_dir(model_dir: str | Path, flag: str = "--model-dir") -> Path:
    """A local ``save_pretrained`` folder of a T5-family model, or a clear error saying what is off.

    A folder holding ``model.tar.gz`` and no config.json is extracted (once per process, see
    :func:`archive.extract_model_archive`) and the extracted folder is returned: callers must use the
    returned path, not the one they passed.
    """
    folder = Path(model_dir)
    if not folder.is_dir():
        raise StepError(f"{flag} {folder}: no such folder")
    archive = folder / MODEL_ARCHIVE
    if not (folder / "config.json").is_file() and archive.is_file():
        label = f"{flag} {archive}"
        return _check_model_files(find_model_root(extract_model_archive(archive, label), label), label)
    return _check_model_files(folder, f"{flag} {folder}")


def _check_model_files(folder: Path, where: str) -> Path:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise StepError(f"{where}: no config.json; expected a folder written by select_model.py or save_pretrained")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StepError(f"{where}: config.json is not valid JSON ({err})") from None
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise StepError(
            f"{where}: model_type {model_type!r} is not supported; flanops works with the "
            f"T5 family ({', '.join(SUPPORTED_MODEL_TYPES)}), e.g. google/flan-t5-base"
        )
    copy_again = "expected a whole model folder (select_model.py or save_pretrained output): copy all of it again"
    if (folder / RUNTIME_DIR).is_dir():
        missing = [name for name in RUNTIME_FILES if not (folder / RUNTIME_DIR / name).is_file()]
        if missing:
            raise StepError(f"{where}: {RUNTIME_DIR}/ lacks {', '.join(missing)}; {copy_again}")
    elif not any(folder.glob("*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
        raise StepError(f"{where}: no weights (*.safetensors) found; {copy_again}")
    if not (folder / "tokenizer_config.json").is_file():
        raise StepError(f"{where}: no tokenizer (tokenizer_config.json) found; {copy_again}")
    for weights in sorted(folder.glob("*.safetensors")):
        _check_safetensors_header(weights, where)
    return folder


def _check_safetensors_header(path: Path, where: str) -> None:
    """Read the file's header only: a cut-off or garbled file fails here in milliseconds, not deep in loading."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy"):
            pass
    except SafetensorError as err:
        raise StepError(f"{where}: {path.name} is not a readable safetensors file ({first_line(err)}); it is corrupted "
                        "or truncated: copy or download the model again") from None
