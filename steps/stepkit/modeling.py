"""Loading and saving model folders: ``save_pretrained`` weights + tokenizer + ``model_card.json``.

A model folder can also arrive as SageMaker hands it to later jobs: a folder holding only
``model.tar.gz`` (a TrainingStep tars /opt/ml/model). :func:`check_model_dir` extracts it once
per process. :func:`package_model` writes one for serving (with ``code/inference.py``);
:func:`pack_folder` one of a folder as it is, as a training job's output.
"""
from __future__ import annotations

import atexit
import fnmatch
import gzip
import io
import json
import os
import shutil
import tarfile
import tempfile
import uuid
import zlib
from pathlib import Path
from typing import Any, Callable

from .ctranslate import RUNTIME_DIR, RUNTIME_FILES
from .ctranslate import load as load_ctranslate2
from .errors import StepError, first_line
from .threads import inference_threads, training_threads
from .wheels import DEFAULT_SERVING_PYTHON, WHEELS_DIR, check_python_version, runtime_wheel
from .wheels import requirements as runtime_requirements

MODEL_CARD = "model_card.json"
MODEL_ARCHIVE = "model.tar.gz"  # SageMaker's name for a packed model directory
SUPPORTED_MODEL_TYPES = ("t5",)


def configure_runtime(parameters: int | None = None) -> int:
    """torch's intra-op threads: the idle cores we were given for training (``parameters`` None), or as many
    as ``threads.inference_threads`` gives a model of that size for generating; plain log lines. Returns the count.

    transformers 5 draws a progress bar per file loaded or saved; in job logs that is noise.
    """
    import torch
    from transformers.utils import logging as transformers_logging

    threads = inference_threads(parameters) if parameters is not None else training_threads()
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)   # else accelerate resets torch to every core under torchrun
    transformers_logging.disable_progress_bar()
    return threads


def read_model_card(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / MODEL_CARD
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise StepError(f"{path}: invalid JSON ({err.msg}, line {err.lineno})") from None


def write_model_card(model_dir: str | Path, card: dict[str, Any]) -> None:
    Path(model_dir, MODEL_CARD).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def check_model_dir(model_dir: str | Path, flag: str = "--model-dir") -> Path:
    """A local ``save_pretrained`` folder of a T5-family model, or a clear error saying what is off.

    A folder holding ``model.tar.gz`` and no config.json is extracted (once per process, see
    :func:`extract_model_archive`) and the extracted folder is returned: callers must use the
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


def _check_weights_fit_config(folder: Path, where: str) -> None:
    """Refuse weights that are not the model config.json describes, naming a tensor.

    transformers would print a table of mismatched shapes and fail pointing at it, and it
    silently initialises missing tensors at random; both mean files of two models were mixed.
    """
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="numpy") as weights:
            found.update({name: (tuple(weights.get_slice(name).get_shape()), path.name) for name in weights.keys()})
    if not found:  # pytorch_model.bin only: left to transformers
        return
    config = AutoConfig.from_pretrained(folder)  # nosec B615 # a local model folder, not the Hub
    with torch.device("meta"):  # shapes without memory
        model = AutoModelForSeq2SeqLM.from_config(config)
    tied: dict[int, list[str]] = {}  # one entry per tensor; tied names (shared and embed_tokens) share one
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        tied.setdefault(id(tensor), []).append(name)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    architecture = f"the {config.model_type} architecture in config.json"
    wrong = [name for name in found if name in expected and found[name][0] != expected[name]]
    if wrong:
        shape, file = found[wrong[0]]
        raise StepError(f"{where}: config.json does not match the weights: {wrong[0]} is {list(shape)} in {file}, "
                        f"{architecture} needs {list(expected[wrong[0]])} ({len(wrong)} tensor(s) differ); config.json "
                        "and the weights come from different models: copy the whole model folder again")
    missing = [names[0] for names in tied.values() if names[0] in expected and not any(name in found for name in names)]
    if missing:
        raise StepError(f"{where}: the weights lack {len(missing)} of the {len(tied)} tensors {architecture} needs "
                        f"(e.g. {missing[0]}); they are from another architecture or incomplete: copy the whole model "
                        "folder again")


def load_model_and_tokenizer(model_dir: str | Path, flag: str = "--model-dir", serving: bool = False):
    """Load a seq2seq model and its tokenizer from a local folder, with errors that name the folder.

    ``serving``: a CTranslate2 model is made ready to run one batch per core group at once (its ``workers``).
    """
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    folder = check_model_dir(model_dir, flag)
    if folder != Path(model_dir):  # errors name the tarball the user gave, not only our temporary folder
        flag = f"{flag} {Path(model_dir) / MODEL_ARCHIVE}, extracted to"
    if (folder / RUNTIME_DIR).is_dir():  # quantize.py's ct2-int8: CTranslate2 runs it
        return load_ctranslate2(folder, f"{flag} {folder}", read_model_card(folder).get("parameters"), serving)
    _check_weights_fit_config(folder, f"{flag} {folder}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)  # nosec B615 # a local model folder, not the Hub
        model = AutoModelForSeq2SeqLM.from_pretrained(folder)  # nosec B615 # a local model folder
    except (OSError, ValueError, RuntimeError) as err:
        raise StepError(f"{flag} {folder}: cannot load the model ({first_line(err)}); "
                        "is a file corrupted or truncated?") from None
    return model, tokenizer


def save_model(model, tokenizer, folder: str | Path, card: dict[str, Any]) -> None:
    """Write weights (safetensors), tokenizer and model card; the card gets the parameter count."""
    model.save_pretrained(folder, safe_serialization=True)
    _record_untied_head(model, Path(folder))
    tokenizer.save_pretrained(folder)
    card = {"parameters": count_parameters(model), **card}
    write_model_card(folder, card)


def _record_untied_head(model, folder: Path) -> None:
    """Write ``tie_word_embeddings: false`` for an untied LM head, as Flan-T5's own configs say.

    transformers 5 always writes ``true`` for T5 (it keeps the real choice in
    ``scale_decoder_outputs``); transformers 4.x would then tie the head and rescale the
    decoder output, silently changing the model. ``false`` loads correctly under both.
    """
    head = getattr(model, "lm_head", None)
    shared = getattr(model, "shared", None)
    if head is None or shared is None or head.weight is shared.weight:
        return
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tie_word_embeddings"] = False
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def count_parameters(model) -> int:
    """The model's parameters; a CTranslate2 model's are its source model's (its card says how many)."""
    if getattr(model, "runtime", None) == "ctranslate2":
        return model.parameter_count
    return sum(p.numel() for p in model.parameters())


def summarize(model, tokenizer, dialogues: list[str], batch_size: int = 32, max_new_tokens: int = 64,
              num_beams: int = 1, max_source_length: int = 512, progress: Callable[[int, int], None] | None = None,
              **generation: Any) -> list[str]:
    """Generate one summary per dialogue with the shared prompt; batches are length-sorted.

    Sorting by length keeps padding (wasted compute) low; results come back in input order.
    ``generation`` holds further ``generate`` settings (e.g. ``no_repeat_ngram_size``, or
    ``do_sample=True`` with ``top_p``); decoding is greedy or beam search unless it says sample.
    ``progress(done, total)`` is called after each batch.
    """
    import torch

    from .prompt import format_prompt

    prompts = [format_prompt(dialogue) for dialogue in dialogues]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    summaries: list[str] = [""] * len(prompts)
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            inputs = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True, truncation=True,
                               max_length=max_source_length)
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                    **{"do_sample": False, **generation})
            for index, text in zip(batch, tokenizer.batch_decode(output, skip_special_tokens=True)):
                summaries[index] = text.strip()
            if progress:
                progress(min(start + batch_size, len(order)), len(order))
    return summaries


# ---------------------------------------------------------------- model.tar.gz

_extracted: dict[tuple[str, int, int], Path] = {}  # (tarball, size, mtime) → its extracted folder, per process


def extract_model_archive(archive: str | Path, label: str) -> Path:
    """Extract a ``model.tar.gz`` into a private temporary folder (removed at exit) and return that folder.

    Cached per tarball, so a step that checks a folder and then loads it extracts once. Members
    are checked first (see :func:`extract_safely`); a corrupt tarball is a StepError naming it.
    """
    archive = Path(archive).absolute()
    stat = archive.stat()
    key = (str(archive), stat.st_size, stat.st_mtime_ns)
    if key in _extracted and _extracted[key].is_dir():
        return _extracted[key]
    destination = Path(tempfile.mkdtemp(prefix="flanops-model-"))
    atexit.register(shutil.rmtree, destination, ignore_errors=True)
    print(f"extracting {archive} ({stat.st_size / 1e6:.1f} MB) to {destination}")
    try:
        extract_safely(archive, destination, label)
    except BaseException:
        shutil.rmtree(destination, ignore_errors=True)
        raise
    _extracted[key] = destination
    return destination


def path_inside(root: Path, relative: str, label: str, advice: str = "") -> Path:
    """``root/relative``, or a StepError (ending with ``advice``) if that would land outside ``root``."""
    target = (root / relative).resolve()
    if relative.startswith("/") or not target.is_relative_to(root.resolve()) or target == root.resolve():
        raise StepError(f"{label} would be written outside the folder it is unpacked into; refusing it{advice}")
    return target


# What to do about an archive that tries to write outside its folder: nothing of it was written.
REPACK = "; nothing was extracted: pack the model again from inside its folder (tar -czf model.tar.gz -C FOLDER .)"


def extract_safely(archive: Path, destination: Path, label: str) -> None:
    """Extract a tarball after checking every member: regular files and folders inside ``destination`` only.

    Checked before anything is written, so a hostile archive leaves nothing behind; tarfile's
    ``data`` filter then guards the extraction itself.
    """
    destination.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                if member.issym() or member.islnk():
                    raise StepError(f"{label}: archive member {member.name!r} is a link, which can point outside the "
                                    f"model folder; refusing it{REPACK}")
                if not (member.isfile() or member.isdir()):
                    raise StepError(f"{label}: archive member {member.name!r} is not a file or folder; refusing to extract")
                if member.name in ("", ".", "./") and member.isdir():
                    continue
                path_inside(destination, member.name, f"{label}: archive member {member.name!r}", REPACK)
            tar.extractall(destination, members=members, filter="data")
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:  # what corrupt or cut-off gzip raises
        raise StepError(f"{label}: not a readable tar archive ({first_line(err)}); is it corrupted or truncated?") from None


def find_model_root(folder: Path, label: str) -> Path:
    """The folder holding config.json: the top, or one level down (some archives wrap a folder)."""
    if (folder / "config.json").is_file():
        return folder
    candidates = sorted(path.parent for path in folder.glob("*/config.json"))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise StepError(f"{label}: no config.json found; expected a save_pretrained folder or a model.tar.gz holding one")
    raise StepError(f"{label}: several model folders ({', '.join(p.name for p in candidates)}); point at one of them")


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


def pack_folder(folder: str | Path, tar_path: str | Path) -> Path:
    """Every file of ``folder`` as it is, as SageMaker packs a training job's /opt/ml/model."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StepError(f"cannot package {folder}: no such folder")
    return write_archive(folder_members(folder), tar_path)


def folder_members(folder: Path, skip=lambda top: False) -> dict[str, Path | bytes | None]:
    """Archive name → file (None for a folder) under ``folder``, except what ``skip`` says of the top-level name."""
    members: dict[str, Path | bytes | None] = {}
    for path in folder.rglob("*"):
        name = path.relative_to(folder).as_posix()
        if not skip(name.split("/")[0]):
            members[name] = None if path.is_dir() else path
    return members


def write_archive(members: dict[str, Path | bytes | None], tar_path: str | Path) -> Path:
    """Write a ``.tar.gz`` of ``members`` (archive name → file to copy, content, or None for a folder).

    Reproducible: the same members give the same bytes (sorted names, mtime 0, owner 0, normalized
    modes, no name or time in the gzip header), so an unchanged model gives an unchanged artifact.
    gzip level 6 (tar czf's): level 9 takes much longer on weights for a percent or two.
    Written to a temporary sibling and renamed, so ``tar_path`` is either absent or complete.
    """
    target = Path(tar_path).absolute()
    partial = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        with open(partial, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as zipped, \
                tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(members):
                _add_member(tar, name, members[name])
        os.replace(partial, target)
    except BaseException as err:
        partial.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise StepError(f"cannot write {target}: {err.strerror or err}") from err
        raise
    return target


def _add_member(tar: tarfile.TarFile, name: str, source: Path | bytes | None) -> None:
    info = tarfile.TarInfo(name)
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    if source is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
    elif isinstance(source, bytes):
        info.mode, info.size = 0o644, len(source)
        tar.addfile(info, io.BytesIO(source))
    else:
        status = os.stat(source)  # follows links: the file's content is packed, never a link
        info.mode, info.size = 0o755 if status.st_mode & 0o100 else 0o644, status.st_size
        with open(source, "rb") as handle:
            tar.addfile(info, handle)


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
