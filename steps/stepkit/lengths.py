"""Token lengths of the splits: percentiles, and how many examples the length limits cut."""
from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from typing import Callable

from .errors import StepError, first_line
from .prompt import format_prompt
from .records import SPLITS

PERCENTILES = (50, 90, 95, 99)
APPROX_TOKEN = re.compile(r"\w+|[^\w\s]")  # a word or one punctuation mark


@dataclass
class TokenCounter:
    name: str
    unit: str
    approximate: bool
    count: Callable[[list[str]], list[int]]


def token_counter(tokenizer_name: str | None, revision: str = "main") -> TokenCounter:
    if not tokenizer_name:
        # The model's own tokenizer may not exist yet (offline it is trained later), so count approximately.
        return TokenCounter(
            f"regex {APPROX_TOKEN.pattern}",
            "approximate tokens (words and punctuation marks; subword tokenizers give more)",
            True,
            lambda texts: [len(APPROX_TOKEN.findall(text)) for text in texts],
        )
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name, revision=revision)
    except (OSError, ValueError) as err:
        raise StepError(
            f"--tokenizer {tokenizer_name}: cannot load it ({first_line(err)}); give a local tokenizer folder, or a Hub id "
            "where the Hub is reachable, or leave --tokenizer out for an approximate count"
        ) from None
    return TokenCounter(
        tokenizer_name,
        "tokens of this tokenizer, special tokens included",
        False,
        lambda texts: [len(ids) for ids in tokenizer(texts, verbose=False)["input_ids"]],
    )


def percentiles(values: list[int]) -> dict[str, int]:
    """Nearest-rank percentiles: each one is a length that actually occurs."""
    ordered = sorted(values)
    stats = {f"p{p}": ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] for p in PERCENTILES}
    stats["max"] = ordered[-1]
    return stats


def length_report(splits: dict[str, list[dict]], counter: TokenCounter, max_source: int, max_target: int) -> dict:
    """Token-length percentiles per split, and how many examples the length limits cut (warned, never silent)."""
    report: dict = {"token_lengths": {}, "truncated": {}}
    for split in SPLITS:
        lengths = {
            "source": counter.count([format_prompt(record["dialogue"]) for record in splits[split]]),
            "target": counter.count([record["summary"] for record in splits[split]]),
        }
        report["token_lengths"][split] = {side: percentiles(values) for side, values in lengths.items()}
        report["truncated"][split] = {}
        for side, limit in (("source", max_source), ("target", max_target)):
            cut = sum(n > limit for n in lengths[side])
            report["truncated"][split][side] = cut
            if cut:
                approximate = " (approximate count)" if counter.approximate else ""
                longest = max(range(len(lengths[side])), key=lengths[side].__getitem__)
                print(f"warning: {cut} of {len(splits[split])} {split} {side}s are longer than --max-{side}-length "
                      f"{limit}{approximate} and will be truncated (longest: id {splits[split][longest]['id']!r}, "
                      f"{lengths[side][longest]:,} tokens)", file=sys.stderr)
    return report
