"""Summary quality: multi-reference ROUGE, the best constant output, fact accuracy and repetition.

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


def _mention_pattern(values: Sequence[str]) -> str:
    """Any of ``values`` as a whole word or figure: "6 pm" is not in "16 pm", "$5" not in "$50"."""
    alternatives = "|".join(re.escape(value) for value in sorted(values, key=len, reverse=True))
    return rf"(?<![\w$])(?:{alternatives})(?!\w)"


def mentions(text: str, value: str) -> bool:
    """Whether ``text`` states ``value`` (ignoring case)."""
    return re.search(_mention_pattern([value]), text, re.IGNORECASE) is not None


def mention_spans(text: str, values: Sequence[str]) -> list[tuple[int, int]]:
    """Where ``text`` states any of ``values``: (start, end) of each mention, in order, not overlapping."""
    if not values:
        return []
    return [match.span() for match in re.finditer(_mention_pattern(values), text, re.IGNORECASE)]


def fact_values(value: object) -> list[str]:
    """A slot's value as the list of strings a summary must state: ``speakers`` holds several names."""
    return list(value) if isinstance(value, list) else [value]


def stated_facts(prediction: str, facts: dict) -> dict[str, list[tuple[str, bool]]]:
    """Each slot's values and whether ``prediction`` states each one: {"day": [("Tuesday", False)], …}."""
    return {slot: [(v, mentions(prediction, v)) for v in fact_values(value)] for slot, value in facts.items()}


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
        for slot, values in stated_facts(prediction, example_facts).items():
            hit = all(stated for _, stated in values)
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


# Degenerate output: a model that loops ("to discusssssss", "at 2 pm at 2 pm at 2 pm"). Digits are left out of
# character runs, since amounts legitimately repeat them ("$10000").
_CHARACTER_RUN = re.compile(r"([^\d\s])\1{3,}")   # one character 4 or more times in a row
_TOKEN = re.compile(r"\w+|[^\w\s]")
SHORT_UNIT_TIMES = 3      # a unit of 1-3 tokens repeated back to back this often ("no, no, no" is not: 2.5)
LONG_UNIT_TOKENS = 4      # a unit this long or longer counts when it comes twice in a row


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def repeated_runs(text: str) -> list[str]:
    """Every run in ``text`` that looks like a model looping, lowercased, in order of position:
    a character 4+ times in a row, a unit of 1-3 tokens 3+ times back to back, or a unit of
    4+ tokens twice back to back."""
    runs = [match.group(0) for match in _CHARACTER_RUN.finditer(text.lower())]
    tokens = _tokens(text)
    for start in range(len(tokens)):
        for size in range(1, (len(tokens) - start) // 2 + 1):
            if tokens[start + size] != tokens[start]:
                continue   # cheap test first: most units are not followed by themselves
            times = SHORT_UNIT_TIMES if size < LONG_UNIT_TOKENS else 2
            unit = tokens[start:start + size]
            if all(tokens[start + k * size:start + (k + 1) * size] == unit for k in range(1, times)):
                runs.append(" ".join(tokens[start:start + times * size]))
    return list(dict.fromkeys(runs))


def unexplained_runs(prediction: str, references: Sequence[str]) -> list[str]:
    """The repeated runs of ``prediction`` that none of its references has (a reference may repeat on purpose)."""
    lowered = [reference.lower() for reference in references]
    token_texts = [f" {' '.join(_tokens(reference))} " for reference in references]
    return [run for run in repeated_runs(prediction)
            if not any(run in text for text in lowered) and not any(f" {run} " in text for text in token_texts)]


def repetition(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """The share of summaries that repeat themselves where no reference does (:func:`unexplained_runs`).

    Returns ``rate`` (0..1), ``examples``, ``repeating`` and up to five ``samples`` ({index, run}).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    repeating = [(index, runs[0]) for index, (prediction, refs) in enumerate(zip(predictions, references))
                 if (runs := unexplained_runs(prediction, refs))]
    count = len(predictions)
    return {"examples": count, "repeating": len(repeating), "rate": len(repeating) / count if count else 0.0,
            "samples": [{"index": index, "run": run} for index, run in repeating[:5]]}
