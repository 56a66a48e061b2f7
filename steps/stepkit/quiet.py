"""Library messages known to be harmless, kept out of job logs unless ``FLANOPS_VERBOSE`` is set.

``flanops run --verbose`` sets ``FLANOPS_VERBOSE=1``; the jobs it runs inherit the client's
environment, so they show these messages too. Each filter below matches one message and says
why it is harmless; everything else a library says still shows.
"""
from __future__ import annotations

import ast
import logging
import os
import warnings

VERBOSE_ENV = "FLANOPS_VERBOSE"

# transformers 5 forces T5Config.tie_word_embeddings to True (the saved flag now only chooses whether
# decoder outputs are scaled), so loading any checkpoint with an LM head of its own, every Flan-T5 and
# every model flanops saves, finds shared.weight and lm_head.weight both present and different, says
# so, and keeps them apart: what the checkpoint means. A mismatch of any other pair still shows.
TIED_HEAD_MESSAGE = "specifies to tie shared.weight to lm_head.weight, but both are present"
# peft 0.21's get_peft_model reads PreTrainedModel.is_gradient_checkpointing, which transformers 5 deprecates.
GRADIENT_CHECKPOINTING_MESSAGE = "`is_gradient_checkpointing` is deprecated"
# peft's merge_and_unload sees the forced tie_word_embeddings=True beside our untied head, and writes
# False into the config: what Flan-T5's own configs say.
MERGED_HEAD_MESSAGE = "Input and output embeddings are no longer tied after merging"
# The Trainer loading the best checkpoint (distill.py): T5's encoder and decoder embeddings are the shared
# embedding itself, so a checkpoint stores it once, as shared.weight, and loading that fills all three. Any
# other missing key still shows.
MISSING_KEYS_MESSAGE = "There were missing keys in the checkpoint model loaded: "
TIED_EMBEDDINGS = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def _only_tied_embeddings_missing(message: str) -> bool:
    if not message.startswith(MISSING_KEYS_MESSAGE):
        return False
    try:
        missing = ast.literal_eval(message[len(MISSING_KEYS_MESSAGE):].rstrip("."))
    except (ValueError, SyntaxError):
        return False
    return isinstance(missing, list) and bool(missing) and set(missing) <= TIED_EMBEDDINGS


class _DropMessages(logging.Filter):
    def __init__(self, is_noise):
        super().__init__()
        self.is_noise = is_noise

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.is_noise(record.getMessage())


# One instance each: addFilter keeps a filter once however often quiet_known_noise runs.
_LOGGER_FILTERS = {"transformers.modeling_utils": _DropMessages(lambda message: TIED_HEAD_MESSAGE in message),
                   "transformers.trainer": _DropMessages(_only_tied_embeddings_missing)}


def quiet_known_noise() -> None:
    """Hide the messages above in this process (nothing when ``FLANOPS_VERBOSE`` is set); safe to call again."""
    if verbose():
        return
    for name, noise in _LOGGER_FILTERS.items():   # a filter on a logger sees only that module's records
        logging.getLogger(name).addFilter(noise)
    warnings.filterwarnings("ignore", message=GRADIENT_CHECKPOINTING_MESSAGE, category=FutureWarning)
    warnings.filterwarnings("ignore", message=MERGED_HEAD_MESSAGE, category=UserWarning)
