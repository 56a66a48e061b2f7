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
import json
import random
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from stepkit.columns import to_record
from stepkit.contract import atomic_output_dir, env_path, path_help, require_output_dir
from stepkit.datafiles import FORMATS, Row, data_files, read_rows
from stepkit.errors import StepError, first_line, run_step
from stepkit.lengths import length_report, token_counter
from stepkit.prompt import PROMPT_TEMPLATE
from stepkit.records import DATA_CARD, SPLITS, split_path, write_jsonl
from stepkit.s3 import download_keys, prefix_keys, s3_errors, split_s3_uri
from stepkit.synthetic import generate_splits, unseen_in_train

SYNTHETIC = "synthetic"
INPUT_ENV = ("SM_CHANNEL_RAW", "SM_CHANNEL_TRAIN")
OUTPUT_ENV = ("SM_OUTPUT_DATA_DIR",)
# Generated in well under a second; enough for a tiny model to learn the task offline.
SYNTHETIC_SIZES = {"train": 2000, "validation": 200, "test": 200}
HELD_OUT_FRACTION = 0.1  # share of the rows for validation and for test when they must be carved out
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation",
    "test": "test", "testing": "test",
}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "name" or "namespace/name"


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


# --- units: a file's or a dataset split's records -----------------------------------------

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
