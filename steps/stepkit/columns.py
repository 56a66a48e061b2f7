"""A source row's columns mapped onto the record contract, its facts checked against its dialogue."""
from __future__ import annotations

import json
import re

from .datafiles import Row
from .errors import StepError
from .metrics import fact_values, mentions

NUMBERED_SUMMARY = re.compile(r"summary_?(\d+)")  # DialogSum test: summary1, summary2, summary3
FACTS_EXAMPLE = '{"speakers": ["Ann", "Bob"], "day": "Tuesday", "time": "2 pm"}'


def text_value(value: object, column: str, where: str) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise StepError(f"{where}: blank {column}; every example needs a non-empty {column}")
    if not isinstance(value, str):
        raise StepError(f"{where}: {column} must be text, got {type(value).__name__}")
    return value.strip()


def json_value(value: object) -> object:
    """Extra columns are kept as they are when JSON can hold them (Parquet dates etc. become text)."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return str(value)
    return value


def to_record(row: Row) -> dict:
    fields = row.fields
    numbered = sorted((int(m.group(1)), name) for name in fields if (m := NUMBERED_SUMMARY.fullmatch(str(name))))
    summary_columns = (["summary"] if "summary" in fields else []) + [name for _, name in numbered]
    missing = (["dialogue"] if "dialogue" not in fields else []) + ([] if summary_columns else ["summary (or summary1..N)"])
    if missing:
        found = ", ".join(map(str, fields)) or "none"
        raise StepError(f"{row.where}: missing column(s) {', '.join(missing)}; found: {found}. Name the columns "
                        "dialogue and summary (summary1..N for several references; id or fname optional)")

    dialogue = text_value(fields["dialogue"], "dialogue", row.where)
    first = text_value(fields[summary_columns[0]], summary_columns[0], row.where)
    listed = fields.get("references")
    if isinstance(listed, list) and listed:  # our own output format read back: all references, summary first
        references = [text_value(value, "references", row.where) for value in listed]
        if references[0] != first:
            references.insert(0, first)
    else:  # later reference columns may be blank (CSV rows with fewer references); identical ones are kept
        later = (fields[name] for name in summary_columns[1:])
        references = [first] + [value.strip() for value in later if isinstance(value, str) and value.strip()]

    id_column = next((name for name in ("id", "fname") if name in fields), None)
    if id_column is None:
        record_id = row.fallback_id
    elif isinstance(fields[id_column], int) and not isinstance(fields[id_column], bool):
        record_id = str(fields[id_column])
    else:
        record_id = text_value(fields[id_column], id_column, row.where)

    consumed = {"dialogue", "references", id_column, *summary_columns}
    extras = {name: json_value(value) for name, value in fields.items() if name not in consumed}
    if extras.get("facts") is None:
        extras.pop("facts", None)   # null: this example records no facts (Parquet and CSV give every row the column)
    else:
        check_facts(extras["facts"], dialogue, row.where)
    return {"id": record_id, "dialogue": dialogue, "summary": references[0], "references": references, **extras}


def check_facts(facts: object, dialogue: str, where: str) -> None:
    """``facts`` maps each slot to a value as text (or a list of them, e.g. speakers) that the dialogue states.

    Checked here, before anything trains: a fact the dialogue lacks would count every summary wrong.
    """
    if not isinstance(facts, dict) or not facts:
        given = "an empty mapping" if isinstance(facts, dict) else f"{type(facts).__name__} {facts!r:.60}"
        raise StepError(f"{where}: facts must map each slot to its value, e.g. {FACTS_EXAMPLE}; got {given}. Fix it, "
                        "or leave facts out (or null) for an example that records none")
    for slot, value in facts.items():
        values = fact_values(value)
        if not slot.strip() or not values or not all(isinstance(v, str) and v.strip() for v in values):
            raise StepError(f"{where}: facts.{slot or '(empty name)'} is {json.dumps(value)[:60]}: each slot needs a "
                            "value as non-empty text as the dialogue says it (or a list of them, e.g. speakers), as "
                            f"in {FACTS_EXAMPLE}")
        missing = [v for v in values if not mentions(dialogue, v)]
        if missing:
            raise StepError(f"{where}: facts.{slot} {missing[0]!r} is not in the dialogue; a fact must be written as "
                            "the dialogue states it (check its spelling and form, e.g. '2 pm' not '14:00'), or remove "
                            "the slot")
