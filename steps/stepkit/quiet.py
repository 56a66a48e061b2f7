"""Library messages known to be harmless, kept out of job logs unless ``FLANOPS_VERBOSE`` is set.

``flanops run --verbose`` sets ``FLANOPS_VERBOSE=1``; the jobs it runs inherit the client's
environment, so they show these messages too. Each filter below matches one message and says
why it is harmless; everything else a library says still shows.
"""
from __future__ import annotations

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


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


_TIED_HEAD_FILTER = _DropMessage(TIED_HEAD_MESSAGE)   # one instance: addFilter keeps it once however often called


def quiet_known_noise() -> None:
    """Hide the messages above in this process (nothing when ``FLANOPS_VERBOSE`` is set); safe to call again."""
    if verbose():
        return
    # The logger transformers' loader writes to; a filter on it sees only that module's records.
    logging.getLogger("transformers.modeling_utils").addFilter(_TIED_HEAD_FILTER)
    warnings.filterwarnings("ignore", message=GRADIENT_CHECKPOINTING_MESSAGE, category=FutureWarning)
    warnings.filterwarnings("ignore", message=MERGED_HEAD_MESSAGE, category=UserWarning)
