"""Summary quality: multi-reference ROUGE, the best constant output, and fact accuracy.

Scores are fractions in [0, 1] (as published for DialogSum); tables print them as points
(x100). ROUGE comes from Google's ``rouge-score``, the reference implementation; with
several references an example scores its best reference per metric (``score_multi``).
"""
from __future__ import annotations

import functools
import random
import re
from statistics import mean
from typing import Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@functools.lru_cache(maxsize=1)
def _scorer():
    """rouge-score's scorer with its own tokenizer (Porter stemming), remembering what it tokenized.

    Stemming is most of ROUGE's cost, and the best-constant-output search scores each reference
    against a hundred candidates: tokenizing each text once made Evaluate's ROUGE several times faster,
    with the same scores.
    """
    from rouge_score import rouge_scorer, tokenizers

    class RememberingTokenizer(tokenizers.Tokenizer):
        def __init__(self):
            self._tokenize = functools.lru_cache(maxsize=1 << 16)(tokenizers.DefaultTokenizer(use_stemmer=True).tokenize)

        def tokenize(self, text):
            return list(self._tokenize(text))   # a copy: the scorer must not change what is remembered

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=RememberingTokenizer())


def _sentences_per_line(text: str) -> str:
    """rougeLsum compares sentence by sentence; it expects one sentence per line."""
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


def rouge_per_example(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[dict[str, float]]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    scorer = _scorer()
    scores = []
    for prediction, refs in zip(predictions, references):
        best = scorer.score_multi([_sentences_per_line(r) for r in refs], _sentences_per_line(prediction))
        scores.append({name: best[name].fmeasure for name in ROUGE_TYPES})
    return scores


def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean best-over-references ROUGE F1 for each of rouge1/2/L/Lsum."""
    per_example = rouge_per_example(predictions, references)
    return {name: mean(s[name] for s in per_example) if per_example else 0.0 for name in ROUGE_TYPES}


def best_constant_output(candidates: Sequence[str], references: Sequence[Sequence[str]], max_candidates: int = 100,
                         seed: int = 0) -> dict:
    """The one candidate summary that, given for every input, scores the highest ROUGE-L.

    It shows what the template alone earns. Distinct candidates beyond ``max_candidates`` are
    sampled (seeded) to bound the cost at max_candidates x len(references) scorings.
    """
    distinct = sorted(set(candidates))
    pool = distinct if len(distinct) <= max_candidates else random.Random(seed).sample(distinct, max_candidates)
    best_text, best_scores = "", {name: 0.0 for name in ROUGE_TYPES}
    for text in pool:
        scores = rouge([text] * len(references), references)
        if scores["rougeL"] > best_scores["rougeL"]:
            best_text, best_scores = text, scores
    return {"text": best_text, "scores": best_scores, "candidates_tried": len(pool), "candidates_distinct": len(distinct)}


def _mentions(text: str, value: str) -> bool:
    return re.search(rf"(?<![\w$]){re.escape(value.lower())}(?!\w)", text.lower()) is not None


def fact_accuracy(predictions: Sequence[str], facts: Sequence[dict | None]) -> dict | None:
    """How often summaries state the right speakers and slot values (dates, times, amounts).

    ``facts[i]`` maps a slot to its value (``speakers`` to a list of names), as synthetic data
    records them. Returns per-slot accuracy, the share with every fact right, and the count,
    or None when the data has no known facts (e.g. DialogSum).
    """
    hits: dict[str, list[bool]] = {}
    all_right: list[bool] = []
    for prediction, example_facts in zip(predictions, facts):
        if not example_facts:
            continue
        example_hits = []
        for slot, value in example_facts.items():
            values = value if isinstance(value, list) else [value]
            hit = all(_mentions(prediction, v) for v in values)
            hits.setdefault(slot, []).append(hit)
            example_hits.append(hit)
        all_right.append(all(example_hits))
    if not all_right:
        return None
    return {
        "examples": len(all_right),
        "all_facts_right": float(mean(all_right)),
        "per_slot": {slot: float(mean(values)) for slot, values in sorted(hits.items())},
    }
