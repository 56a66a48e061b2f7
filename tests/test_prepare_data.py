"""prepare_data.py: every input kind, the data card, and a clear error for each kind of bad input."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flanops.steps import prepare_data
from conftest import run_step
from stepkit.contract import COMPLETE_MARKER
from stepkit.errors import run_step as run_in_process
from stepkit.prompt import PROMPT_TEMPLATE, format_prompt
from stepkit.records import DATA_CARD, SPLITS, read_split

SCRIPT = "prepare_data.py"


def _rows(n: int, prefix: str = "row") -> list[dict]:
    return [
        {"id": f"{prefix}-{i}", "dialogue": f"#Person1#: Hello {i}.\n#Person2#: Hi, how are you?", "summary": f"They greet {i}."}
        for i in range(n)
    ]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _card(folder: Path) -> dict:
    return json.loads((folder / DATA_CARD).read_text(encoding="utf-8"))


def _prepare(*argv: str) -> None:
    """Run the step in this process (fast, and lets tests monkeypatch libraries)."""
    assert prepare_data.main(list(argv)) == 0


# --- synthetic: the offline default -----------------------------------------------------

@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "data"
    result = run_step(SCRIPT, "--output-dir", str(out))
    return out, result


def test_synthetic_default_writes_three_splits_and_success_marker(synthetic_run):
    out, result = synthetic_run
    assert (out / COMPLETE_MARKER).is_file()
    counts = {split: len(read_split(out, split)) for split in SPLITS}
    assert counts == {"train": 2000, "validation": 200, "test": 200}
    record = read_split(out, "test")[0]
    assert {"id", "dialogue", "summary", "references", "topic", "intent", "facts"} <= set(record)
    assert record["summary"] == record["references"][0] and len(record["references"]) >= 2
    assert str(out) in result.stdout and "train 2000" in result.stdout


def test_synthetic_data_card(synthetic_run):
    out, _ = synthetic_run
    card = _card(out)
    assert card["source"]["kind"] == "synthetic" and card["seed"] == 42
    assert card["counts"] == {"train": 2000, "validation": 200, "test": 200}
    assert card["prompt_template"] == PROMPT_TEMPLATE
    assert card["tokenizer"]["approximate"] is True and "approximate" in card["tokenizer"]["unit"]
    for split in SPLITS:
        for side in ("source", "target"):
            stats = card["token_lengths"][split][side]
            assert list(stats) == ["p50", "p90", "p95", "p99", "max"]
            assert 0 < stats["p50"] <= stats["p90"] <= stats["p95"] <= stats["p99"] <= stats["max"]
        assert card["truncated"][split] == {"source": 0, "target": 0}
    # The source is the full prompt, so it is longer than the summary target.
    assert card["token_lengths"]["train"]["source"]["p50"] > card["token_lengths"]["train"]["target"]["max"]
    for split in ("validation", "test"):  # held-out combinations the model never saw in training
        assert 0 < card["unseen_in_train"][split]["intent_day_pair"] < 1
        assert card["unseen_in_train"][split]["speaker_name"] == card["unseen_in_train"][split]["amount"] == 1.0


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    sizes = ("--train-size", "50", "--validation-size", "10", "--test-size", "10")
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        _prepare("--output-dir", str(tmp_path / name), "--seed", seed, *sizes)
    for name in (*(f"{split}.jsonl" for split in SPLITS), DATA_CARD):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl").read_bytes()


def test_truncation_is_counted_per_split_and_warned(tmp_path, capsys):
    out = tmp_path / "out"
    _prepare("--output-dir", str(out), "--train-size", "40", "--validation-size", "10", "--test-size", "10",
             "--max-source-length", "100", "--max-target-length", "15")
    card = _card(out)
    assert card["max_source_length"] == 100 and card["max_target_length"] == 15
    for split in SPLITS:
        examples = len(read_split(out, split))
        assert 0 < card["truncated"][split]["source"] <= examples
        assert 0 < card["truncated"][split]["target"] <= examples
    err = capsys.readouterr().err
    assert re.search(r"warning: \d+ of 40 train sources are longer than --max-source-length 100", err)
    assert "--max-target-length 15" in err


def test_help_and_env_defaults(tmp_path, monkeypatch):
    help_text = run_step(SCRIPT, "--help").stdout
    assert "--output-dir" in help_text and "SM_OUTPUT_DATA_DIR" in help_text and "SM_CHANNEL_RAW" in help_text

    channel = _write_jsonl(tmp_path / "channel" / "data.jsonl", _rows(12))
    monkeypatch.setenv("SM_CHANNEL_RAW", str(channel.parent))
    monkeypatch.setenv("SM_OUTPUT_DATA_DIR", str(tmp_path / "sm-output"))
    _prepare()
    card = _card(tmp_path / "sm-output")
    assert card["source"]["input"] == str(channel.parent) and sum(card["counts"].values()) == 12


# --- local files -------------------------------------------------------------------------

def test_dialogsum_files_bring_all_references_and_topics(dialogsum_dir, tmp_path):
    out = tmp_path / "out"
    _prepare("--input", str(dialogsum_dir), "--output-dir", str(out))
    card = _card(out)
    assert card["source"]["files"] == ["dialogsum.dev.jsonl", "dialogsum.test.jsonl"]
    assert card["counts"] == {"train": 800, "validation": 100, "test": 100}  # dev + test pooled, no train file
    records = [record for split in SPLITS for record in read_split(out, split)]
    by_id = {record["id"]: record for record in records}
    assert len(by_id) == 1000  # ids come from fname
    test_0 = by_id["test_0"]  # summary1..3 become the references, in order
    assert len(test_0["references"]) == 3 and test_0["summary"] == test_0["references"][0]
    assert test_0["summary"].startswith("Ms. Dawson helps #Person1# to write a memo")
    assert {"topic1", "topic2", "topic3"} <= set(test_0) and "summary1" not in test_0 and "fname" not in test_0
    dev_0 = by_id["dev_0"]
    assert len(dev_0["references"]) == 1 and "topic" in dev_0
    assert sum(len(r["references"]) == 3 for r in records) == 500


def test_single_dialogsum_file_with_real_tokenizer_lengths(dialogsum_dir, tmp_path):
    """--tokenizer with a local folder: exact counts, labelled as such."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    word_level = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()  # splits like \w+|[^\w\s]+
    tokenizer_dir = tmp_path / "tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]").save_pretrained(tokenizer_dir)

    out = tmp_path / "out"
    _prepare("--input", str(dialogsum_dir / "dialogsum.test.jsonl"), "--output-dir", str(out),
             "--tokenizer", str(tokenizer_dir), "--max-source-length", "200")
    card = _card(out)
    assert card["tokenizer"]["name"] == str(tokenizer_dir) and card["tokenizer"]["approximate"] is False
    prompts = [format_prompt(record["dialogue"]) for record in read_split(out, "test")]
    expected_max = max(len(re.findall(r"\w+|[^\w\s]+", prompt)) for prompt in prompts)
    assert card["token_lengths"]["test"]["source"]["max"] == expected_max
    assert card["truncated"]["train"]["source"] > 0  # DialogSum prompts often exceed 200 tokens


def test_folder_with_named_csv_parquet_jsonl_keeps_its_splits(tmp_path):
    raw = tmp_path / "raw"
    train = [
        {"fname": f"t{i}", "dialogue": f'#Person1#: "Hi", she said, {i}\n#Person2#: Hello.', "summary1": f"Greeting {i}.",
         "summary2": f"They say hi {i}." if i % 2 else "", "topic": "greeting"}
        for i in range(6)
    ]
    _write_csv(raw / "train.csv", train)
    _write_parquet(raw / "dev.parquet", [{**row, "id": f"d{i}", "score": i / 2} for i, row in enumerate(_rows(3))])
    _write_jsonl(raw / "test.jsonl", _rows(2, prefix="test"))
    (raw / "README.txt").write_text("not data")

    out = tmp_path / "out"
    _prepare("--input", str(raw), "--output-dir", str(out))
    card = _card(out)
    assert card["counts"] == {"train": 6, "validation": 3, "test": 2}
    assert card["source"]["splits_from"] == "by file or split name"
    train_out = read_split(out, "train")
    assert [r["id"] for r in train_out] == [f"t{i}" for i in range(6)]  # file order kept
    assert train_out[0]["dialogue"].startswith('#Person1#: "Hi", she said, 0\n')  # quoted comma and line break
    assert train_out[1]["references"] == ["Greeting 1.", "They say hi 1."]
    assert train_out[0]["references"] == ["Greeting 0."]  # a blank extra reference is dropped
    assert read_split(out, "validation")[2]["score"] == 1.0


def test_one_unnamed_csv_is_pooled_and_split_by_fractions_with_the_seed(tmp_path):
    data = _write_csv(tmp_path / "dialogues.csv", _rows(40))
    fractions = ("--validation-fraction", "0.25", "--test-fraction", "0.1")
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        _prepare("--input", str(data), "--output-dir", str(tmp_path / name), "--seed", seed, *fractions)
    assert _card(tmp_path / "a")["counts"] == {"train": 26, "validation": 10, "test": 4}
    ids = [r["id"] for split in SPLITS for r in read_split(tmp_path / "a", split)]
    assert sorted(ids) == sorted(f"row-{i}" for i in range(40))  # every row once, none twice
    test_files = [(tmp_path / name / "test.jsonl").read_bytes() for name in "abc"]
    assert test_files[0] == test_files[1] != test_files[2]


def test_max_examples_caps_every_split(tmp_path):
    out = tmp_path / "out"
    _prepare("--output-dir", str(out), "--max-examples", "7")
    assert _card(out)["counts"] == {"train": 7, "validation": 7, "test": 7}


# --- bad input: exit code 2, a message naming the file (and line), no output ---------------

def _bad_jsonl_line(tmp_path: Path, line: str, name: str = "bad.jsonl") -> Path:
    path = tmp_path / name
    rows = [json.dumps(row) for row in _rows(5)]
    rows.insert(1, line)  # the bad record is on line 2
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, list[str]]]:
    """name → (input path, fragments the error message must contain)."""
    cases = {}
    missing_columns = _write_jsonl(tmp_path / "missing.jsonl", [{"text": "hi", "label": "x"}] * 5)
    cases["missing columns"] = (missing_columns, [f"{missing_columns}:1", "missing column(s) dialogue, summary", "found: text, label"])
    (tmp_path / "empty.jsonl").write_text("")
    cases["empty file"] = (tmp_path / "empty.jsonl", [f"{tmp_path / 'empty.jsonl'}: empty file"])
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    cases["only blank lines"] = (tmp_path / "blank.jsonl", [f"{tmp_path / 'blank.jsonl'}: no records"])
    path = _bad_jsonl_line(tmp_path, '{"id": "x", "dialogue": "hi", ')
    cases["invalid json"] = (path, [f"{path}:2:", "invalid JSON"])
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"".join((json.dumps(r) + "\n").encode() for r in _rows(2)) + '{"id": "z", "dialogue": "caf\xe9"}\n'.encode("latin-1"))
    cases["not utf-8"] = (path, [f"{path}:3:", "not UTF-8", "0xe9"])
    path = _bad_jsonl_line(tmp_path, json.dumps({"id": "b", "dialogue": "   ", "summary": "s"}), "blank-dialogue.jsonl")
    cases["blank dialogue"] = (path, [f"{path}:2:", "blank dialogue"])
    path = _bad_jsonl_line(tmp_path, json.dumps({"id": "b", "dialogue": "d", "summary": ""}), "blank-summary.jsonl")
    cases["blank summary"] = (path, [f"{path}:2:", "blank summary"])
    path = _write_jsonl(tmp_path / "dup.jsonl", _rows(4) + [{**_rows(3)[2], "summary": "Another summary."}])
    cases["duplicate ids"] = (path, [f"duplicate id 'row-2' at {path}:3 and {path}:5", "different examples"])
    path = tmp_path / "bad.csv"
    path.write_text('id,dialogue,summary\na,"hi",s\nb,hi,s,extra\n', encoding="utf-8")
    cases["csv extra field"] = (path, [f"{path}:3:", "3 columns"])
    path = tmp_path / "unclosed.csv"
    path.write_text('id,dialogue,summary\na,"hi,s\n', encoding="utf-8")
    cases["csv unclosed quote"] = (path, [f"{path}:", "cannot parse as CSV"])
    path = tmp_path / "truncated.parquet"
    path.write_bytes(_write_parquet(tmp_path / "whole.parquet", _rows(5)).read_bytes()[:60])
    cases["parquet truncated"] = (path, [f"{path}: cannot read as Parquet"])
    path = _write_jsonl(tmp_path / "json-inside.parquet", _rows(5))
    cases["json named .parquet"] = (path, [f"{path}: not a Parquet file", "looks like JSON"])
    path = _write_jsonl(tmp_path / "json-inside.csv", _rows(5))
    cases["json named .csv"] = (path, [f"{path}: looks like JSON, not CSV"])
    path = tmp_path / "parquet-inside.jsonl"
    path.write_bytes((tmp_path / "whole.parquet").read_bytes())
    cases["parquet named .jsonl"] = (path, [f"{path}: looks like a Parquet file, not JSON Lines"])
    path = tmp_path / "data.txt"
    path.write_text("hello")
    cases["unsupported extension"] = (path, [f"{path}: unsupported file type '.txt'"])
    cases["missing file"] = (tmp_path / "nowhere.jsonl", [f"{tmp_path / 'nowhere.jsonl'}: no such file or folder"])
    (tmp_path / "empty-folder").mkdir()
    cases["folder without data"] = (tmp_path / "empty-folder", [f"{tmp_path / 'empty-folder'}: no .jsonl, .json, .csv, .parquet files"])
    path = _write_jsonl(tmp_path / "two.jsonl", _rows(2))
    cases["too few rows"] = (path, [f"{path}: 2 rows to split", "1 validation + 1 test + at least 1 train need 3"])
    return cases


BAD_INPUTS = [
    "missing columns", "empty file", "only blank lines", "invalid json", "not utf-8", "blank dialogue", "blank summary",
    "duplicate ids", "csv extra field", "csv unclosed quote", "parquet truncated", "json named .parquet",
    "json named .csv", "parquet named .jsonl", "unsupported extension", "missing file", "folder without data", "too few rows",
]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_a_clear_error_and_leaves_no_output(tmp_path, case):
    source, fragments = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out" / "data"
    result = run_step(SCRIPT, "--input", str(source), "--output-dir", str(out), check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr
    assert not out.exists() and not any((tmp_path / "out").iterdir())  # no output, no staging left behind


def test_flags_that_do_not_fit_the_input_are_refused(tmp_path, capsys):
    data = _write_jsonl(tmp_path / "d.jsonl", _rows(20))
    assert run_in_process(prepare_data.main, ["--input", str(data), "--output-dir", str(tmp_path / "o"), "--train-size", "5"]) == 2
    assert "--train-size apply to --input synthetic only" in capsys.readouterr().err
    assert run_in_process(prepare_data.main, ["--output-dir", str(tmp_path / "o"), "--test-fraction", "0.2"]) == 2
    assert "--test-fraction apply to files and datasets" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_non_empty_output_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    argv = ["--output-dir", str(out), "--max-examples", "5"]
    assert run_in_process(prepare_data.main, argv) == 2
    assert "not empty" in capsys.readouterr().err and (out / "old.txt").is_file()
    assert run_in_process(prepare_data.main, [*argv, "--overwrite"]) == 0
    assert not (out / "old.txt").exists() and (out / COMPLETE_MARKER).is_file()


# --- S3 ------------------------------------------------------------------------------------

@pytest.fixture
def s3(fake_aws_credentials):
    import boto3
    from moto import mock_aws

    with mock_aws():
        client = boto3.client("s3")
        client.create_bucket(Bucket="raw-data")
        yield client


def _put_jsonl(client, key: str, rows: list[dict]) -> None:
    client.put_object(Bucket="raw-data", Key=key, Body="".join(json.dumps(r) + "\n" for r in rows).encode())


def test_s3_prefix_is_downloaded_and_read_as_a_folder(s3, tmp_path):
    _put_jsonl(s3, "dialogsum/train.jsonl", _rows(8, "tr"))
    _put_jsonl(s3, "dialogsum/validation.jsonl", _rows(3, "va"))
    _put_jsonl(s3, "dialogsum/test.jsonl", _rows(2, "te"))
    _put_jsonl(s3, "dialogsum-old/train.jsonl", _rows(50, "old"))  # shares the text prefix, not the folder
    out = tmp_path / "out"
    _prepare("--input", "s3://raw-data/dialogsum", "--output-dir", str(out))
    card = _card(out)
    assert card["source"]["kind"] == "s3" and card["counts"] == {"train": 8, "validation": 3, "test": 2}
    assert sorted(card["source"]["files"]) == ["test.jsonl", "train.jsonl", "validation.jsonl"]
    assert read_split(out, "test")[0]["id"] == "te-0"


def test_s3_errors_name_the_bucket_prefix_or_object(s3, tmp_path, capsys, reliability):
    out = str(tmp_path / "out")
    seen = []
    for uri, message in (("s3://no-such-bucket/x", "bucket 'no-such-bucket' does not exist; check its name"),
                         ("s3://raw-data/nothing-here/", "nothing-here/: no objects under this prefix; check the bucket")):
        code = run_in_process(prepare_data.main, ["--input", uri, "--output-dir", out])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err, err
        seen.append(f"exit {code}: {err}")
    assert not Path(out).exists()
    reliability.record("data.missing_s3", f"{' | '.join(seen)}; nothing written")
    s3.put_object(Bucket="raw-data", Key="broken/train.jsonl", Body=b'{"id": 1}\n{oops\n')
    assert run_in_process(prepare_data.main, ["--input", "s3://raw-data/broken", "--output-dir", out]) == 2
    assert "s3://raw-data/broken/train.jsonl:2: invalid JSON" in capsys.readouterr().err
    _put_jsonl(s3, "sneaky/../../outside.jsonl", _rows(5))  # would be written outside the download folder
    assert run_in_process(prepare_data.main, ["--input", "s3://raw-data/sneaky", "--output-dir", out]) == 2
    assert "leaves the prefix" in capsys.readouterr().err
    assert not Path(out).exists()


# --- Hugging Face datasets -----------------------------------------------------------------

def test_hub_dataset_dict_maps_onto_the_splits(monkeypatch, tmp_path):
    import datasets

    requested = []

    def fake_load_dataset(dataset_id, *args, **kwargs):
        requested.append(dataset_id)
        return datasets.DatasetDict({
            name: datasets.Dataset.from_list([{**row, "topic": name} for row in _rows(n, name)])
            for name, n in (("train", 9), ("validation", 4), ("test", 3))
        })

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    out = tmp_path / "out"
    _prepare("--input", "knkarthick/dialogsum", "--output-dir", str(out))
    card = _card(out)
    assert requested == ["knkarthick/dialogsum"]
    assert card["source"]["kind"] == "huggingface" and card["counts"] == {"train": 9, "validation": 4, "test": 3}
    assert card["source"]["splits"] == {"knkarthick/dialogsum[train]": "train", "knkarthick/dialogsum[validation]": "validation",
                                        "knkarthick/dialogsum[test]": "test"}
    validation = read_split(out, "validation")
    assert [r["id"] for r in validation] == [f"validation-{i}" for i in range(4)] and validation[0]["topic"] == "validation"


def test_hub_dataset_without_validation_gets_one_carved_from_train(monkeypatch, tmp_path):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.DatasetDict({
        "train": datasets.Dataset.from_list(_rows(20, "train")), "test": datasets.Dataset.from_list(_rows(5, "test")),
    }))
    out = tmp_path / "out"
    _prepare("--input", "someone/dialogues", "--output-dir", str(out))
    assert _card(out)["counts"] == {"train": 18, "validation": 2, "test": 5}
    assert all(r["id"].startswith("train-") for r in read_split(out, "validation"))


def test_unreachable_hub_is_a_short_error(tmp_path):
    out = tmp_path / "out"
    offline = {"HF_HUB_OFFLINE": "1"}  # fail at once instead of retrying a hub that is not there
    result = run_step(SCRIPT, "--input", "knkarthick/dialogsum", "--output-dir", str(out), check=False, env=offline)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: --input knkarthick/dialogsum: not a local file or folder, and the Hugging Face Hub cannot load it" in result.stderr
    result = run_step(SCRIPT, "--tokenizer", "google/flan-t5-small", "--output-dir", str(out), check=False, env=offline)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: --tokenizer google/flan-t5-small: cannot load it" in result.stderr
    assert not out.exists()
