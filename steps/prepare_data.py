"""Prepare the dialogue → summary splits that every later step reads.

``--input`` chooses the source:

* ``synthetic`` (the offline default): the seeded generator in ``stepkit.synthetic``;
* a local ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file or a folder of them (a
  SageMaker channel is such a folder);
* ``s3://bucket/prefix``: the objects are downloaded, then read like a local folder;
* a Hugging Face dataset id such as ``knkarthick/dialogsum`` (where the Hub is reachable).

Columns map onto the record contract (``stepkit.records``): ``id`` or ``fname`` → ``id``;
``summary`` and/or ``summary1..N`` → ``summary`` (the first) and ``references`` (all); other
columns (``topic`` ...) are kept. An optional ``facts`` column maps each slot to the value a correct
summary states (``{"speakers": ["Ann", "Bob"], "day": "Tuesday"}``); each value must appear in the
dialogue, since the evaluation and the gate check summaries against it. Files or dataset splits named train / validation (dev) /
test keep their split; anything else is pooled and split with ``--seed``.

``--output-dir`` receives ``train.jsonl``, ``validation.jsonl``, ``test.jsonl`` and
``data_card.json``, published atomically: after an error nothing appears there.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import random
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from stepkit.contract import COMPLETE_MARKER, atomic_output_dir, env_path, path_help, require_output_dir
from stepkit.errors import StepError, first_line, run_step
from stepkit.metrics import fact_values, mentions
from stepkit.prompt import PROMPT_TEMPLATE, format_prompt
from stepkit.records import DATA_CARD, SPLITS, iter_jsonl, json_problem, read_text, split_path, write_jsonl
from stepkit.s3 import download_keys, prefix_keys, s3_errors, split_s3_uri
from stepkit.synthetic import generate_splits, unseen_in_train

SYNTHETIC = "synthetic"
INPUT_ENV = ("SM_CHANNEL_RAW", "SM_CHANNEL_TRAIN")
OUTPUT_ENV = ("SM_OUTPUT_DATA_DIR",)
# Generated in well under a second; enough for a tiny model to learn the task offline.
SYNTHETIC_SIZES = {"train": 2000, "validation": 200, "test": 200}
HELD_OUT_FRACTION = 0.1  # share of the rows for validation and for test when they must be carved out
FORMATS = {".jsonl": "JSON Lines", ".json": "JSON", ".csv": "CSV", ".parquet": "Parquet"}
# Leading bytes of compressed or archive files that are sometimes saved under a data file's extension.
PACKED_FORMATS = {b"\x1f\x8b": "a gzip-compressed file", b"PK\x03\x04": "a ZIP archive (or an Excel workbook)",
                  b"BZh": "a bzip2-compressed file", b"\xfd7zXZ\x00": "an xz-compressed file"}
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation",
    "test": "test", "testing": "test",
}
PERCENTILES = (50, 90, 95, 99)
APPROX_TOKEN = re.compile(r"\w+|[^\w\s]")  # a word or one punctuation mark
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "name" or "namespace/name"
NUMBERED_SUMMARY = re.compile(r"summary_?(\d+)")  # DialogSum test: summary1, summary2, summary3


# --- command line -------------------------------------------------------------------------

def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """This script's flags (flanops checks a config's ``steps`` settings against them)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # --max-step must not pass for --max-steps
    parser.add_argument(
        "--input", default=env_path(*INPUT_ENV) or SYNTHETIC,
        help="'synthetic', a .jsonl/.json/.csv/.parquet file or folder, s3://bucket/prefix, or a Hugging Face "
             f"dataset id (default: ${' or $'.join(INPUT_ENV)}, else synthetic)",
    )
    parser.add_argument("--output-dir", default=env_path(*OUTPUT_ENV),
                        help=path_help("where the splits and data card go", *OUTPUT_ENV))
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    parser.add_argument("--seed", type=int, default=42,
                        help="seed for generating (synthetic) or for shuffling and splitting (default: 42)")
    for split, size in SYNTHETIC_SIZES.items():
        parser.add_argument(f"--{split}-size", type=positive_int,
                            help=f"synthetic only: {split} examples (default: {size})")
    for split in ("validation", "test"):
        parser.add_argument(
            f"--{split}-fraction", type=fraction,
            help=f"files and datasets only: share of the rows carved out as {split} when no {split} file or split "
                 f"exists (default: {HELD_OUT_FRACTION})",
        )
    parser.add_argument("--max-examples", type=positive_int,
                        help="keep at most this many examples per split (quick runs)")
    parser.add_argument("--max-source-length", type=positive_int, default=512,
                        help="source tokens the fine-tune step keeps; longer prompts are counted as truncated (default: 512)")
    parser.add_argument("--max-target-length", type=positive_int, default=128,
                        help="target tokens the fine-tune step keeps; longer summaries are counted as truncated (default: 128)")
    parser.add_argument("--tokenizer", help="local tokenizer folder or Hub id to count tokens with (default: an approximate "
                                            "word/punctuation count)")
    parser.add_argument("--revision", default="main",
                        help="Hub revision for a Hub dataset --input or Hub --tokenizer: a commit sha pins exactly that "
                             "data (default: main)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_flags_fit_input(args: argparse.Namespace) -> None:
    """Sizes only apply to synthetic data and fractions only to real data: say so instead of ignoring them."""
    sizes = [f"--{s}-size" for s in SPLITS if getattr(args, f"{s}_size") is not None]
    fractions = [f"--{s}-fraction" for s in ("validation", "test") if getattr(args, f"{s}_fraction") is not None]
    if args.input == SYNTHETIC and fractions:
        raise StepError(f"{', '.join(fractions)} apply to files and datasets; for synthetic data use --train-size etc.")
    if args.input != SYNTHETIC and sizes:
        raise StepError(
            f"{', '.join(sizes)} apply to --input synthetic only; for {args.input} use --validation-fraction, "
            "--test-fraction or --max-examples"
        )
    held_out = (args.validation_fraction or HELD_OUT_FRACTION) + (args.test_fraction or HELD_OUT_FRACTION)
    if held_out >= 1:
        raise StepError(
            f"--validation-fraction + --test-fraction is {held_out:g}; it must stay below 1 to leave rows for train"
        )


# --- reading rows ------------------------------------------------------------------------

@dataclass
class Row:
    """One input row before it becomes a record, with where it came from for error messages."""

    where: str        # "path:line", "path row N" ...
    fallback_id: str  # when the source has neither an id nor a fname column
    fields: dict


@dataclass
class Unit:
    """One file or dataset split: its records and the split its name gives it (None if none)."""

    label: str
    split: str | None
    records: list[dict]
    wheres: list[str]  # where each record came from, for error messages


def split_named_by(name: str) -> str | None:
    """'dialogsum.dev.jsonl' → validation, 'train/part-0.parquet' → train; None if no or several splits."""
    words = re.split(r"[^a-z]+", name.lower())
    found = {SPLIT_ALIASES[word] for word in words if word in SPLIT_ALIASES}
    return found.pop() if len(found) == 1 else None


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


# --- rows → records ----------------------------------------------------------------------

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


FACTS_EXAMPLE = '{"speakers": ["Ann", "Bob"], "day": "Tuesday", "time": "2 pm"}'


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


def make_unit(label: str, split: str | None, rows: list[Row]) -> Unit:
    return Unit(label, split, [to_record(row) for row in rows], [row.where for row in rows])


def splits_named(units: list[Unit]) -> bool:
    """Whether file or split names give every unit its split, train among them (else all rows are pooled)."""
    return all(unit.split for unit in units) and any(unit.split == "train" for unit in units)


def drop_repeats(units: list[Unit]) -> list[dict]:
    """Drop exact repeats of an example and refuse one id given to different examples, per split.

    Ids must be unique within a split (or within the pool that is split): predictions and error
    messages name examples by id. The same example twice (same id, same fields) is what
    concatenated exports leave behind, so the repeat is dropped with a warning. The same id in
    two named splits is allowed (files often number their rows from 1); a dialogue that is in
    train and in a held-out split is warned about after splitting (:func:`overlap_with_train`).
    Returns the repeats dropped: {"id", "kept", "dropped"} with where each came from.
    """
    named = splits_named(units)
    first: dict[tuple[str, str], tuple[dict, str]] = {}
    conflicts: dict[tuple[str, str], list[str]] = {}
    repeats: list[dict] = []
    for unit in units:
        kept: list[tuple[dict, str]] = []
        for record, where in zip(unit.records, unit.wheres):
            key = (unit.split if named else "", record["id"])
            if key not in first:
                first[key] = (record, where)
                kept.append((record, where))
            elif first[key][0] == record:
                repeats.append({"id": record["id"], "kept": first[key][1], "dropped": where})
            else:
                conflicts.setdefault(key, [first[key][1]]).append(where)
        unit.records, unit.wheres = [record for record, _ in kept], [where for _, where in kept]
    if conflicts:
        (split, record_id), wheres = next(iter(conflicts.items()))
        scope = f"the {split} split" if split else "the data"
        more = f" (and {len(conflicts) - 1} more duplicated id(s))" if len(conflicts) > 1 else ""
        raise StepError(f"duplicate id {record_id!r} at {' and '.join(wheres)}: different examples under one id in "
                        f"{scope}{more}; give each example its own id (column id or fname) or remove one")
    if repeats:
        example = repeats[0]
        print(f"warning: dropped {len(repeats)} exact repeat(s) of an example (same id and fields), e.g. "
              f"{example['id']!r} at {example['dropped']} repeats {example['kept']}", file=sys.stderr)
    return repeats


def overlap_with_train(splits: dict[str, list[dict]]) -> dict[str, int]:
    """Held-out dialogues that are also in train (whitespace ignored), warned about: they inflate test scores."""
    def text(record: dict) -> str:
        return " ".join(record["dialogue"].split())

    train = {text(record) for record in splits["train"]}
    overlap = {}
    for split in ("validation", "test"):
        shared = [record for record in splits[split] if text(record) in train]
        overlap[split] = len(shared)
        if shared:
            print(f"warning: {len(shared)} of {len(splits[split])} {split} dialogues are also in train (e.g. id "
                  f"{shared[0]['id']!r}); scores on {split} will look better than they are: remove them from train",
                  file=sys.stderr)
    return overlap


# --- sources -----------------------------------------------------------------------------

def data_files(folder: Path) -> list[Path]:
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


def local_units(path: Path) -> tuple[list[Unit], list[str]]:
    """Units for a file or every data file under a folder, and their names relative to it."""
    root = path.parent if path.is_file() else path
    files = [path] if path.is_file() else data_files(path)
    names = [str(file.relative_to(root)) for file in files]
    units = [make_unit(str(file), split_named_by(name.rsplit(".", 1)[0]), read_rows(file)) for file, name in zip(files, names)]
    return units, names


def s3_units(uri: str) -> tuple[list[Unit], list[str]]:
    """Download ``s3://bucket/prefix`` (one object or everything below it) and read it as a folder."""
    import boto3

    label = f"--input {uri}"
    bucket, prefix = split_s3_uri(uri, "--input")
    with tempfile.TemporaryDirectory(prefix="prepare-data-s3-") as tmp:
        local = Path(tmp)
        with s3_errors(label, bucket):
            client = boto3.client("s3")  # region and endpoint come from the environment
            folder, keys = prefix_keys(client, bucket, prefix)
            if not keys:
                raise StepError(f"{label}: no objects under this prefix; check the bucket and prefix")
            download_keys(client, bucket, keys, folder, local, label)
        print(f"downloaded {len(keys)} object(s) from {uri}")
        try:
            units, names = local_units(local)
        except StepError as err:  # name the S3 object, not its temporary copy
            raise StepError(str(err).replace(str(local), f"s3://{bucket}/{folder}".rstrip("/"))) from None
    return units, names


def hub_units(dataset_id: str, revision: str) -> list[Unit]:
    import datasets

    try:
        loaded = datasets.load_dataset(dataset_id, revision=revision)
    except Exception as err:  # offline, missing, gated and broken datasets all raise different types
        raise StepError(
            f"--input {dataset_id}: not a local file or folder, and the Hugging Face Hub cannot load it as a dataset "
            f"({first_line(err)}); without Hub access, pass the dataset's files, a folder or an s3:// prefix"
        ) from None
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("data", loaded)]
    units = []
    for name, dataset in parts:
        label = f"{dataset_id}[{name}]"
        rows = [Row(f"{label} row {number}", f"{name}-{number}", row) for number, row in enumerate(dataset.to_list(), start=1)]
        if not rows:
            raise StepError(f"{label}: the split is empty")
        units.append(make_unit(label, split_named_by(name), rows))
    return units


def load_units(source: str, revision: str = "main") -> tuple[list[Unit], dict]:
    """Read ``--input`` (other than synthetic) into units, and describe the source for the data card."""
    if source.startswith("s3://"):
        units, names = s3_units(source)
        return units, {"kind": "s3", "input": source, "files": names}
    path = Path(source).expanduser()
    if path.exists():
        units, names = local_units(path)
        return units, {"kind": "local", "input": source, "files": names}
    if path.suffix.lower() in FORMATS or not HUB_ID.fullmatch(source):
        raise StepError(f"--input {source}: no such file or folder")
    print(f"{source} is not a local path; loading it as a Hugging Face dataset id")
    units = hub_units(source, revision)
    return units, {"kind": "huggingface", "input": source, "revision": revision,
                   "splits": {unit.label: unit.split for unit in units}}


def assign_splits(units: list[Unit], fractions: dict[str, float], seed: int, source: str) -> tuple[dict[str, list[dict]], str]:
    """Keep the splits that names give when they include train; otherwise pool and split with the seed.

    A named split that is missing (e.g. only train and test files) is carved out of train.
    """
    if splits_named(units):
        splits = {split: [r for unit in units if unit.split == split for r in unit.records] for split in SPLITS}
        how = "by file or split name"
    else:
        splits = {"train": [r for unit in units for r in unit.records], "validation": [], "test": []}
        how = "pooled"
        print(f"note: the input names no complete set of splits including train ({', '.join(u.label for u in units)}); "
              f"pooling all {len(splits['train'])} rows")
    missing = [split for split in SPLITS if not splits[split]]
    if missing:
        pool = splits["train"]
        sizes = {split: max(1, round(len(pool) * fractions[split])) for split in missing}
        needed = sum(sizes.values()) + 1
        if len(pool) < needed:
            wanted = " + ".join(f"{n} {split}" for split, n in sizes.items())
            raise StepError(
                f"{source}: {len(pool)} rows to split, but {wanted} + at least 1 train need {needed}; "
                "add rows or provide validation/test files"
            )
        shuffled = list(pool)
        random.Random(seed).shuffle(shuffled)
        for split in missing:
            splits[split], shuffled = shuffled[: sizes[split]], shuffled[sizes[split]:]
        splits["train"] = shuffled
        how += f"; {' and '.join(missing)} carved out of train with seed {seed}"
    return splits, how


# --- token lengths -----------------------------------------------------------------------

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


# --- main --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output_dir = require_output_dir(args.output_dir, "--output-dir", args.overwrite, *OUTPUT_ENV)
    check_flags_fit_input(args)
    counter = token_counter(args.tokenizer, args.revision)  # before reading data: a bad --tokenizer fails fast

    with atomic_output_dir(output_dir, args.overwrite) as staging:
        if args.input == SYNTHETIC:
            sizes = {split: getattr(args, f"{split}_size") or size for split, size in SYNTHETIC_SIZES.items()}
            print(f"generating synthetic dialogues with seed {args.seed}")
            splits = generate_splits(sizes, args.seed)
            source, how = {"kind": SYNTHETIC, "input": SYNTHETIC, "sizes": sizes}, "generated"
        else:
            print(f"reading {args.input}")
            units, source = load_units(args.input, args.revision)
            source["repeats_dropped"] = len(drop_repeats(units))
            fractions = {split: getattr(args, f"{split}_fraction") or HELD_OUT_FRACTION for split in ("validation", "test")}
            splits, how = assign_splits(units, fractions, args.seed, args.input)
        source["splits_from"] = how
        if args.max_examples:
            splits = {split: records[: args.max_examples] for split, records in splits.items()}

        card = {
            "source": source,
            "seed": args.seed,
            "counts": {split: len(splits[split]) for split in SPLITS},
            "prompt_template": PROMPT_TEMPLATE,
            "tokenizer": {"name": counter.name, "unit": counter.unit, "approximate": counter.approximate},
            "max_source_length": args.max_source_length,
            "max_target_length": args.max_target_length,
            "overlap_with_train": overlap_with_train(splits),
            **length_report(splits, counter, args.max_source_length, args.max_target_length),
        }
        recorded = [record["facts"] for split in SPLITS for record in splits[split] if record.get("facts")]
        if recorded:   # what the evaluation's fact accuracy and the gate's MinFactAccuracy will check
            card["facts"] = {"examples": len(recorded), "slots": sorted({slot for facts in recorded for slot in facts})}
        if args.input == SYNTHETIC:
            card["unseen_in_train"] = {
                split: unseen_in_train(splits["train"], splits[split]) for split in ("validation", "test")
            }
        for split in SPLITS:
            write_jsonl(split_path(staging, split), splits[split])
        (staging / DATA_CARD).write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    print(f"splits ({how}): {', '.join(f'{split} {n}' for split, n in card['counts'].items())}")
    print(f"wrote {', '.join(f'{split}.jsonl' for split in SPLITS)} and {DATA_CARD} to {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_step(main))
