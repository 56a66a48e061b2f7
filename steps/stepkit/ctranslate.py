"""CTranslate2: the CPU serving runtime of the ``ct2-int8`` variant (quantize.py), and the threads models run on.

CTranslate2 (OpenNMT's inference engine for Transformer models) converts a Hugging Face T5
folder into its own format and runs it with int8 GEMMs and a C++ decoding loop: measured here
4-5x faster at batch 1 than transformers' ``generate`` on fp32, and 4x smaller, embeddings and
LM head included. A ``ct2-int8`` model folder is a normal flanops model folder (Hugging Face
``config.json``, ``generation_config.json``, tokenizer, ``model_card.json``) whose weights are
``ctranslate2/`` (``model.bin``, ``config.json``, ``shared_vocabulary.json``) instead of
safetensors; :func:`load` returns a model object whose ``generate`` takes the arguments of
transformers' ``generate`` that flanops uses, so ``stepkit.generation.summarize`` and
``stepkit.cost`` treat every variant alike.

Generation settings map one to one (``num_beams`` → ``beam_size``, ``max_new_tokens`` →
``max_decoding_length``, ``min_new_tokens`` → ``min_decoding_length``, ``length_penalty``,
``no_repeat_ngram_size``, ``repetition_penalty``, sampling's ``top_k``/``top_p``/``temperature``)
except ``early_stopping``, which CTranslate2's beam search does not have: it always stops once
``num_beams`` hypotheses are finished (transformers' ``early_stopping=True``).

Threads: as many intra-op threads as ``stepkit.threads.inference_threads`` gives the model's size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import StepError, first_line
from .threads import inference_threads, usable_cpus

RUNTIME_DIR = "ctranslate2"             # inside a model folder: CTranslate2's converted model
RUNTIME_FILES = ("model.bin", "config.json", "shared_vocabulary.json")
METHODS = {"ct2-int8": "int8"}          # quantize.py method → CTranslate2 quantization (weights, embeddings, head)


def is_ctranslate2_folder(folder: str | Path) -> bool:
    return (Path(folder) / RUNTIME_DIR / "model.bin").is_file()


def convert(model_dir: Path, output_dir: Path, method: str, where: str) -> None:
    """Convert the Hugging Face model in ``model_dir`` to CTranslate2 in ``output_dir/ctranslate2``."""
    import ctranslate2

    target = output_dir / RUNTIME_DIR
    try:
        converter = ctranslate2.converters.TransformersConverter(str(model_dir))
        converter.convert(str(target), quantization=METHODS[method], force=True)
    except (ValueError, NotImplementedError, OSError, RuntimeError, KeyError) as err:
        raise StepError(f"{where}: CTranslate2 cannot convert this model ({first_line(err)}); it converts "
                        "float32/bfloat16 T5 save_pretrained folders (select_model, finetune_lora, distill or prune "
                        "output): quantize the model those steps wrote") from None
    missing = [name for name in RUNTIME_FILES if not (target / name).is_file()]
    if missing:
        raise StepError(f"{where}: CTranslate2's converter wrote no {', '.join(missing)}; nothing was published")


class CTranslate2Seq2Seq:
    """A CTranslate2 ``Translator`` behind the part of transformers' ``generate`` API flanops uses.

    ``generate`` takes token ids (a padded batch and its attention mask) and returns a padded
    tensor of output ids starting with the decoder start token, as transformers does, so that
    ``tokenizer.batch_decode(..., skip_special_tokens=True)`` reads it. Thread-safe: the
    translator runs up to ``workers`` batches at once (from as many threads), each on ``threads``
    intra-op threads.
    """

    runtime = "ctranslate2"

    def __init__(self, folder: Path, tokenizer, config, parameters: int | None, serving: bool = False):
        import ctranslate2

        self.folder, self.tokenizer, self.config = folder, tokenizer, config
        self.parameter_count = parameters
        self.threads = inference_threads(parameters)
        # serving: the cores split into groups of `threads`, each running a batch of its own
        self.workers = max(1, usable_cpus() // self.threads) if serving else 1
        self.translator = ctranslate2.Translator(str(folder / RUNTIME_DIR), device="cpu", compute_type="default",
                                                 intra_threads=self.threads, inter_threads=self.workers)

    def eval(self):   # transformers' API: nothing to switch off
        return self

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 20, min_new_tokens: int = 0,
                 num_beams: int = 1, do_sample: bool = False, length_penalty: float = 1.0,
                 no_repeat_ngram_size: int = 0, repetition_penalty: float = 1.0, early_stopping: Any = None,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 50):
        import torch

        rows = input_ids.tolist()
        masks = attention_mask.tolist() if attention_mask is not None else [[1] * len(row) for row in rows]
        sources = [self.tokenizer.convert_ids_to_tokens([i for i, keep in zip(row, mask) if keep])
                   for row, mask in zip(rows, masks)]
        results = self.translator.translate_batch(
            sources, beam_size=num_beams, max_decoding_length=max_new_tokens,
            min_decoding_length=min(min_new_tokens, max_new_tokens), length_penalty=length_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size, repetition_penalty=repetition_penalty,
            sampling_topk=top_k if do_sample else 1, sampling_topp=top_p if do_sample else 1.0,
            sampling_temperature=temperature if do_sample else 1.0, max_input_length=0, return_end_token=True)
        start = self.config.decoder_start_token_id
        pad = self.config.pad_token_id
        outputs = [[start, *self.tokenizer.convert_tokens_to_ids(result.hypotheses[0])] for result in results]
        width = max(len(ids) for ids in outputs)
        return torch.tensor([ids + [pad] * (width - len(ids)) for ids in outputs])


def load(folder: Path, where: str, parameters: int | None, serving: bool = False):
    """(model, tokenizer) of a ``ct2-int8`` model folder (``parameters``: its model card's); errors name the folder."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        import ctranslate2  # noqa: F401  (the runtime must be installed: say so before anything else)
    except ImportError:
        raise StepError(f"{where}: a CTranslate2 model needs the ctranslate2 package: pip install ctranslate2 "
                        "(a model.tar.gz that flanops packaged installs it from code/wheels/)") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)  # nosec B615 # a local model folder, not the Hub
        config = AutoConfig.from_pretrained(folder)  # nosec B615 # a local model folder
        model = CTranslate2Seq2Seq(folder, tokenizer, config, parameters, serving)
    except (OSError, ValueError, RuntimeError) as err:
        raise StepError(f"{where}: cannot load the CTranslate2 model ({first_line(err)}); is a file in "
                        f"{RUNTIME_DIR}/ corrupted or truncated? Copy the whole model folder again") from None
    return model, tokenizer
