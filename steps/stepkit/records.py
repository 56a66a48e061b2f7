"""The data contract between steps: three JSONL splits of dialogue → summary records.

Every record has ``id``, ``dialogue``, ``summary`` (the first reference) and ``references``
(all references, ``summary`` first). Synthetic data adds ``facts``: the speaker names and
slot values (dates, times, amounts) that a correct summary must state.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Iterator

from .errors import StepError

SPLITS = ("train", "validation", "test")
DATA_CARD = "data_card.json"
REQUIRED_FIELDS = ("id", "dialogue", "summary", "references")


def split_path(data_dir: str | Path, split: str) -> Path:
    return Path(data_dir) / f"{split}.jsonl"


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line, with errors that name the line.

    Lines are decoded one by one, so a decode error names its own line (a text-mode reader
    reports offsets within its read buffer, not the file).
    """
    path = Path(path)
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise StepError(f"{path}:{number}: not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                                "re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                cut_off = not raw.endswith(b"\n")  # only the last line can lack its line break
                hint = ("the file ends inside this record: it looks truncated; copy or export it again" if cut_off
                        else "each line must be one complete JSON object")
                raise StepError(f"{path}:{number}: {json_problem(err)}; {hint}") from None
            if not isinstance(row, dict):
                raise StepError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            yield number, row


def json_problem(err: json.JSONDecodeError) -> str:
    """"invalid JSON at column 28 (Unterminated string)"."""
    return f"invalid JSON at column {err.colno} ({json_reason(err)})"


def json_reason(err: json.JSONDecodeError) -> str:
    """json's message without its dangling "… starting at" (a position json would append)."""
    return re.sub(r"( starting)? at$", "", err.msg)


def read_text(path: str | Path) -> str:
    """A whole UTF-8 text file (a leading BOM is dropped), with a decode error that names the line."""
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line_no = err.object[: err.start].count(b"\n") + 1
        raise StepError(
            f"{path}:{line_no}: not UTF-8 (byte 0x{err.object[err.start]:02x}); re-encode the file as UTF-8"
        ) from None


def read_split(data_dir: str | Path, split: str) -> list[dict]:
    """Read one prepared split, checking the contract so later steps fail early and clearly."""
    path = split_path(data_dir, split)
    if not path.is_file():
        raise StepError(f"{path}: missing; --data-dir should be the output folder of prepare_data.py")
    rows = []
    for number, row in iter_jsonl(path):
        missing = [field for field in REQUIRED_FIELDS if field not in row]
        if missing:
            raise StepError(f"{path}:{number}: missing field(s) {', '.join(missing)}")
        rows.append(row)
    if not rows:
        raise StepError(f"{path}: the {split} split is empty")
    return rows
