"""Loading and saving model folders: ``save_pretrained`` weights + tokenizer + ``model_card.json``."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import StepError, first_line

MODEL_CARD = "model_card.json"
SUPPORTED_MODEL_TYPES = ("t5",)


def configure_runtime() -> None:
    """Use every core we were given (SM_NUM_CPUS on SageMaker) and no more; plain log lines.

    transformers 5 draws a progress bar per file loaded or saved; in job logs that is noise.
    """
    import torch
    from transformers.utils import logging as transformers_logging

    cpus = int(os.environ.get("SM_NUM_CPUS") or os.cpu_count() or 1)
    torch.set_num_threads(max(1, cpus))
    transformers_logging.disable_progress_bar()


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
    """A local ``save_pretrained`` folder of a T5-family model, or a clear error saying what is off."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise StepError(f"{flag} {folder}: no such folder")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise StepError(f"{flag} {folder}: no config.json; expected a folder written by select_model.py or save_pretrained")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StepError(f"{config_path}: not valid JSON ({err})") from None
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise StepError(
            f"{flag} {folder}: model_type {model_type!r} is not supported; flanops works with the "
            f"T5 family ({', '.join(SUPPORTED_MODEL_TYPES)}), e.g. google/flan-t5-base"
        )
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
        raise StepError(f"{flag} {folder}: no weights (*.safetensors) found")
    if not (folder / "tokenizer_config.json").is_file():
        raise StepError(f"{flag} {folder}: no tokenizer (tokenizer_config.json) found")
    return folder


def load_model_and_tokenizer(model_dir: str | Path, flag: str = "--model-dir"):
    """Load a seq2seq model and its tokenizer from a local folder, with errors that name the folder."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    folder = check_model_dir(model_dir, flag)
    if read_model_card(folder).get("quantization"):  # written by quantize.py: int8 needs its own loader
        from .quantization import load_quantized

        return load_quantized(folder, flag)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSeq2SeqLM.from_pretrained(folder)
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
    """Float parameters plus the int8 weights packed inside quantized layers, which ``parameters()`` misses."""
    from torch.ao.nn.quantized.modules.linear import LinearPackedParams

    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, LinearPackedParams):  # holds the weights of torch's int8 Linear and of ours
            weight, bias = module._weight_bias()
            total += weight.numel() + (bias.numel() if bias is not None else 0)
    return total


def summarize(model, tokenizer, dialogues: list[str], batch_size: int = 32, max_new_tokens: int = 64,
              num_beams: int = 1, max_source_length: int = 512) -> list[str]:
    """Generate one summary per dialogue with the shared prompt; batches are length-sorted.

    Sorting by length keeps padding (wasted compute) low; results come back in input order.
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
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
            for index, text in zip(batch, tokenizer.batch_decode(output, skip_special_tokens=True)):
                summaries[index] = text.strip()
    return summaries
