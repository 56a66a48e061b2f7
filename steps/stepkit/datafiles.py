"""Rows read from JSONL, JSON, CSV and Parquet files and folders of them, with one-line errors."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .contract import COMPLETE_MARKER
from .errors import StepError, first_line
from .records import DATA_CARD, iter_jsonl, json_problem, read_text

FORMATS = {".jsonl": "JSON Lines", ".json": "JSON", ".csv": "CSV", ".parquet": "Parquet"}
# Leading bytes of compressed or archive files that are sometimes saved under a data file's extension.
PACKED_FORMATS = {b"\x1f\x8b": "a gzip-compressed file", b"PK\x03\x04": "a ZIP archive (or an Excel workbook)",
                  b"BZh": "a bzip2-compressed file", b"\xfd7zXZ\x00": "an xz-compressed file"}


@dataclass
class Row:
    """One input row before it becomes a record, with where it came from for error messages."""

    where: str        # "path:line", "path row N" ...
    fallback_id: str  # when the source has neither an id nor a fname column
    fields: dict


def check_content_matches_extension(path: Path) -> None:
    """Catch e.g. JSON saved as .csv up front, before a parser reports something confusing."""
    with open(path, "rb") as head_file:
        head = head_file.read(64).lstrip()
    suffix = path.suffix.lower()
    packed = next((kind for magic, kind in PACKED_FORMATS.items() if head.startswith(magic)), None)
    if packed:  # a text reader would only see "not UTF-8"
        raise StepError(f"{path}: looks like {packed}, not {FORMATS[suffix]}; unpack it and pass the "
                        f"{', '.join(FORMATS)} file(s) inside (a folder of them works too)")
    looks_like = "Parquet" if head.startswith(b"PAR1") else "JSON" if head[:1] in (b"{", b"[") else None
    hint = "; rename the file to match its content or convert it"
    if suffix == ".parquet" and looks_like != "Parquet":
        seems = f", it looks like {looks_like}" if looks_like else ""
        raise StepError(f"{path}: not a Parquet file (no PAR1 header){seems}{hint}")
    if suffix != ".parquet" and looks_like == "Parquet":
        raise StepError(f"{path}: looks like a Parquet file, not {FORMATS[suffix]}{hint}")
    if suffix == ".csv" and looks_like == "JSON":
        raise StepError(f"{path}: looks like JSON, not CSV{hint}")


def read_jsonl_rows(path: Path) -> list[Row]:
    return [Row(f"{path}:{number}", f"{path.stem}-{number}", row) for number, row in iter_jsonl(path)]


def read_json_rows(path: Path) -> list[Row]:
    text = read_text(path)
    if not text.lstrip().startswith("["):
        return read_jsonl_rows(path)  # .json is often JSON Lines too (the Hugging Face convention)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise StepError(f"{path}:{err.lineno}: {json_problem(err)}; the file must hold one JSON array of objects, "
                        "or one JSON object per line") from None
    rows = []
    for number, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise StepError(f"{path}: item {number} of the array is {type(item).__name__}, expected a JSON object")
        rows.append(Row(f"{path} item {number}", f"{path.stem}-{number}", item))
    return rows


def read_csv_rows(path: Path) -> list[Row]:
    reader = csv.reader(io.StringIO(read_text(path), newline=""), strict=True)
    header: list[str] | None = None
    rows: list[Row] = []
    end_line = 0
    try:
        for values in reader:
            start_line, end_line = end_line + 1, reader.line_num  # a quoted value can span lines
            if not values:
                continue
            if header is None:
                header = values
                continue
            if len(values) != len(header):
                raise StepError(
                    f"{path}:{start_line}: {len(values)} values but the header has {len(header)} columns; "
                    "is a value with a comma, quote or line break missing its quotes?"
                )
            rows.append(Row(f"{path}:{start_line}", f"{path.stem}-{start_line}", dict(zip(header, values))))
    except csv.Error as err:
        raise StepError(f"{path}:{reader.line_num}: cannot parse as CSV ({err}); is a quote left open, or the file "
                        "truncated?") from None
    return rows


def read_parquet_rows(path: Path) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise StepError(f"{path}: cannot read as Parquet ({first_line(err)}); is it truncated or corrupted? "
                        "Copy or export it again") from None
    rows = enumerate(table.to_pylist(), start=1)
    return [Row(f"{path} row {number}", f"{path.stem}-{number}", row) for number, row in rows]


READERS: dict[str, Callable[[Path], list[Row]]] = {
    ".jsonl": read_jsonl_rows, ".json": read_json_rows, ".csv": read_csv_rows, ".parquet": read_parquet_rows,
}


def read_rows(path: Path) -> list[Row]:
    suffix = path.suffix.lower()
    if suffix not in READERS:
        raise StepError(f"{path}: unsupported file type '{suffix or '(no extension)'}'; use {', '.join(FORMATS)}")
    try:
        if path.stat().st_size == 0:
            raise StepError(f"{path}: empty file (0 bytes); was it written or copied completely? Pass a file with "
                            "one dialogue per record")
        check_content_matches_extension(path)
        rows = READERS[suffix](path)
    except OSError as err:  # unreadable (permissions, a broken link ...)
        raise StepError(f"{path}: cannot read it ({err.strerror or err})") from None
    if not rows:
        raise StepError(f"{path}: no records in the file (only blank lines or a header?)")
    return rows


def data_files(folder: Path) -> list[Path]:
    """The data files under ``folder``, sorted; hidden files and a prepared folder's card and marker are left out."""
    candidates = sorted(
        path for path in folder.rglob("*")
        if path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        and path.name not in (DATA_CARD, COMPLETE_MARKER)  # a prepared folder can be read back
    )
    files = [path for path in candidates if path.suffix.lower() in FORMATS]
    skipped = [str(path.relative_to(folder)) for path in candidates if path not in files]
    if skipped:
        print(f"note: skipping {len(skipped)} file(s) that are not {', '.join(FORMATS)}: {', '.join(skipped[:5])}")
    if not files:
        raise StepError(f"{folder}: no {', '.join(FORMATS)} files in this folder")
    return files
