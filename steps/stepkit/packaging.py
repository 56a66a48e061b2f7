"""A model folder as a SageMaker ``model.tar.gz`` for serving: the handler, stepkit and configs 4.x reads."""
from __future__ import annotations

import fnmatch
import json
from pathlib import Path

from .archive import folder_members, pack_folder, write_archive
from .ctranslate import RUNTIME_DIR
from .errors import StepError
from .wheels import DEFAULT_SERVING_PYTHON, WHEELS_DIR, check_python_version, runtime_wheel
from .wheels import requirements as runtime_requirements

# What package_model leaves out of a model folder: step bookkeeping and training by-products
# (finetune_lora.py's adapter/ and curve, distill.py's curve, Trainer checkpoints), and an older code/.
NOT_PACKED = ("_SUCCESS", "adapter", "training_curve.json", "code")
NOT_PACKED_PATTERNS = ("checkpoint-*",)
HANDLER_FILE = "inference.py"  # steps/inference.py, beside this package
INFERENCE_REQUIREMENTS = """\
# pip-installed by the Hugging Face inference toolkit when the endpoint's container starts.
# Deliberately no packages: code/inference.py and code/stepkit need only torch, transformers,
# tokenizers and safetensors, which every Hugging Face PyTorch inference image has (the artifact
# is checked under transformers 4.51.3 and 5.x); listing them here would replace the image's
# tested versions at every start.
"""


def package_model(model_dir: str | Path, tar_path: str | Path, serving_python: str = DEFAULT_SERVING_PYTHON,
                  wheelhouse: str | Path | None = None, ship_runtime_wheel: bool = True) -> Path:
    """Write ``model_dir`` as a SageMaker ``model.tar.gz`` for serving (the Model Registry, endpoints).

    A model folder (one with config.json) gets SageMaker's serving layout, files at the archive
    root: weights, tokenizer, configs and model card, plus ``code/inference.py`` (the handler),
    ``code/requirements.txt`` and ``code/stepkit/`` (what the handler imports). Training leftovers
    (:data:`NOT_PACKED`) stay out; config.json and tokenizer_config.json are written so that
    transformers 4.x reads them as 5.x does (:func:`portable_config`). A CTranslate2 model also
    gets its runtime's wheel for the serving image's ``serving_python`` in ``code/wheels/``, from
    ``wheelhouse`` or fetched once (see stepkit/wheels.py), so that it serves without network. A folder without a model
    (optimize.py's SKIPPED.json) is packed as it is, like :func:`pack_folder`.
    """
    folder = Path(model_dir)
    if not folder.is_dir():
        raise StepError(f"cannot package {folder}: no such folder")
    if not (folder / "config.json").is_file():
        return pack_folder(folder, tar_path)
    members = folder_members(folder, skip=lambda top: top in NOT_PACKED or
                             any(fnmatch.fnmatch(top, pattern) for pattern in NOT_PACKED_PATTERNS))
    for name in ("config.json", "tokenizer_config.json"):
        if isinstance(members.get(name), Path):
            members[name] = portable_config(name, members[name].read_bytes())
    stepkit = Path(__file__).resolve().parent
    handler = stepkit.parent / HANDLER_FILE
    if not handler.is_file():
        raise StepError(f"cannot package {folder}: the inference handler {handler} is missing; "
                        "it ships beside stepkit/ in the steps folder")
    members.update({"code": None, "code/stepkit": None, f"code/{HANDLER_FILE}": handler,
                    "code/requirements.txt": INFERENCE_REQUIREMENTS.encode()})
    if (folder / RUNTIME_DIR).is_dir() and not ship_runtime_wheel:
        members["code/requirements.txt"] = runtime_requirements(None).encode()
    elif (folder / RUNTIME_DIR).is_dir():
        wheel = runtime_wheel(check_python_version(serving_python), wheelhouse)
        members.update({f"code/{WHEELS_DIR}": None, f"code/{WHEELS_DIR}/{wheel.name}": wheel,
                        "code/requirements.txt": runtime_requirements(wheel).encode()})
    members.update({f"code/stepkit/{path.relative_to(stepkit).as_posix()}": path
                    for path in stepkit.rglob("*.py") if "__pycache__" not in path.parts})
    return write_archive(members, tar_path)


def portable_config(name: str, content: bytes) -> bytes:
    """config.json / tokenizer_config.json as transformers 5 writes them, made readable by 4.x with the same result.

    transformers 5 writes what 4.x (the Hugging Face inference images run 4.37 to 4.51.3) cannot read or reads
    differently:
      * tokenizer_config.json ``extra_special_tokens`` as a list: 4.x expects a dict of named
        tokens and fails; a list is 4.x's ``additional_special_tokens``, which 5.x reads too;
      * ``tokenizer_class: TokenizersBackend``, a 5.x name: ``PreTrainedTokenizerFast`` is that
        class in both;
      * config.json ``dtype``, which 4.x calls ``torch_dtype``: both are written.
    The rest is left as written (4.x ignores the keys it does not know). tests/test_inference_handler.py
    serves every variant under 4.51.3 and 5.x: the same summaries. Idempotent, so an extracted
    artifact packs to the same bytes again.
    """
    values = json.loads(content)
    if name == "tokenizer_config.json":
        extra = values.get("extra_special_tokens")
        if isinstance(extra, list):
            del values["extra_special_tokens"]
            known = values.get("additional_special_tokens") or []
            values["additional_special_tokens"] = list(dict.fromkeys([*known, *extra]))
        if values.get("tokenizer_class") == "TokenizersBackend":
            values["tokenizer_class"] = "PreTrainedTokenizerFast"
    elif name == "config.json" and "dtype" in values:
        values.setdefault("torch_dtype", values["dtype"])
    return (json.dumps(values, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
