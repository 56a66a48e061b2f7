"""``model_card.json``: what each step records about the model folder it writes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import StepError

MODEL_CARD = "model_card.json"


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

