"""Loading and saving model folders: ``save_pretrained`` weights + tokenizer + ``model_card.json``.

A folder holding only ``model.tar.gz`` loads too (:func:`modelcheck.check_model_dir` extracts it
once per process); ``packaging.package_model`` writes one for serving.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .archive import MODEL_ARCHIVE
from .ctranslate import RUNTIME_DIR
from .ctranslate import load as load_ctranslate2
from .errors import StepError, first_line
from .modelcard import read_model_card, write_model_card
from .modelcheck import check_model_dir


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
