"""Summaries from a loaded model: the shared prompt, length-sorted batches."""
from __future__ import annotations

from typing import Any, Callable


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
