"""The one prompt template, in the Flan style the Flan-T5 models were instruction-tuned with."""
from __future__ import annotations

PROMPT_TEMPLATE = "Summarize the following conversation.\n\n{dialogue}\n\nSummary:"


def format_prompt(dialogue: str) -> str:
    return PROMPT_TEMPLATE.format(dialogue=dialogue.strip())
