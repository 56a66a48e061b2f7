"""Bad input as a user meets it (issue 9): one clear line, exit code 2, and nothing half-written.

Each case runs the way a user runs it: a step script as its own process (conftest's run_step),
``flanops`` as a command, the endpoint as ``flanops serve`` over HTTP. The failing line must say
what was wrong, where (file, line, field) and what to do; stderr holds no traceback; no output that
looks complete appears, and a file the user already had in the output folder is kept (steps run
with --overwrite, so only the atomic publish protects it). Files are in tests/bad_inputs/ (see its
README); big or model-shaped inputs are made here. Every case records what it observed for
RELIABILITY.md (tests/reliability.py).

Proven elsewhere, and recorded there: an S3 URI that does not exist (test_prepare_data), the step
scripts' own refusal of rank 0, temperature 0 and amount 1 (test_finetune_evaluate, test_distill,
test_prune) and of a model id outside the catalog (test_select_model).
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import kill_processes_under, run_step
from test_model_archive import TINY_DIMS

from flanops.steps import select_model
from stepkit import catalog
from stepkit.archive import MODEL_ARCHIVE
from stepkit.contract import COMPLETE_MARKER
from stepkit.modeling import save_model
from stepkit.packaging import package_model
from stepkit.records import DATA_CARD, SPLITS

CORPUS = Path(__file__).resolve().parent / "bad_inputs"
USER_FILE = "notes.txt"   # the user's own file in the output folder: a failed step must keep it
JSON_TYPE = "application/json"


# ----------------------------------------------------------------------------- helpers
def without_aws() -> dict[str, str]:
    """This environment without AWS settings: nothing here may reach a real account."""
    return {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}


def flanops(*arguments: str, home: Path) -> subprocess.CompletedProcess:
    """The ``flanops`` command, with a FLANOPS_HOME of its own (an embedded AWS it starts would live there)."""
    return subprocess.run([sys.executable, "-m", "flanops.pipelines.cli", *arguments], capture_output=True, text=True,
                          env={**without_aws(), "FLANOPS_HOME": str(home)}, timeout=120)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a refused command (argparse writes ``prog: error:``), after checking
    the exit code and that no traceback was printed."""
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:") or ": error: " in line]
    assert len(lines) == 1, result.stderr
    return lines[0]


def readable(text: str, *folders: Path) -> str:
    """``text`` for RELIABILITY.md: the corpus as tests/bad_inputs, temporary folders as …"""
    text = text.replace(str(CORPUS), "tests/bad_inputs")
    for folder in folders:
        text = text.replace(str(folder), "…")
    return text


def user_output_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / USER_FILE).write_text("keep me\n")
    return folder


def assert_untouched(folder: Path) -> str:
    """The user's folder as it was (nothing added, no _SUCCESS) and no staging folder beside it."""
    assert sorted(path.name for path in folder.iterdir()) == [USER_FILE]
    assert (folder / USER_FILE).read_text() == "keep me\n"
    assert not [path for path in folder.parent.iterdir() if path.name.startswith(f".{folder.name}.")]
    return f"output folder untouched ({USER_FILE} kept, no {COMPLETE_MARKER}, no partial folder)"


def assert_says(line: str, fragments: list[str]) -> None:
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"


# ----------------------------------------------------------------------------- data
DATA_CASES = [   # (case, file in bad_inputs/data, what the line must say: where, what was wrong, what to do)
    ("data.empty", "empty.jsonl", ["empty.jsonl: empty file (0 bytes)", "copied completely"]),
    ("data.truncated", "truncated.jsonl", ["truncated.jsonl:4: invalid JSON at column", "looks truncated",
                                           "copy or export it again"]),
    ("data.non_utf8", "latin1.jsonl", ["latin1.jsonl:3: not UTF-8 (byte 0xe9", "re-encode the file as UTF-8"]),
    ("data.wrong_columns", "wrong_columns.jsonl", ["wrong_columns.jsonl:1: missing column(s) dialogue, summary",
                                                   "found: text, label", "Name the columns dialogue and summary"]),
    ("data.duplicate_ids", "duplicate_ids.jsonl", ["duplicate id 'd-2' at", "duplicate_ids.jsonl:2 and",
                                                   "duplicate_ids.jsonl:4", "give each example its own id"]),
    ("data.wrong_format", "parquet_inside.jsonl", ["parquet_inside.jsonl: looks like a Parquet file, not JSON Lines",
                                                   "rename the file"]),
    ("data.wrong_format", "gzip_inside.jsonl", ["gzip_inside.jsonl: looks like a gzip-compressed file, not JSON Lines",
                                                "unpack it"]),
    ("data.wrong_format", "text_inside.parquet", ["text_inside.parquet: not a Parquet file (no PAR1 header), it looks "
                                                  "like JSON", "rename the file"]),
    ("data.bad_facts", "facts_not_a_mapping.jsonl", ["facts_not_a_mapping.jsonl:2: facts must map each slot to its "
                                                     "value, e.g. {\"speakers\": [\"Ann\", \"Bob\"]",
                                                     "got str 'Priya, Xena, Friday, 7 pm'", "Fix it, or leave facts out"]),
    ("data.bad_facts", "facts_value_not_text.jsonl", ["facts_value_not_text.jsonl:1: facts.time is 14",
                                                      "value as non-empty text as the dialogue says it"]),
    ("data.bad_facts", "facts_value_not_in_dialogue.jsonl", ["facts_value_not_in_dialogue.jsonl:3: facts.day 'Tuesday' "
                                                             "is not in the dialogue", "check its spelling and form",
                                                             "or remove the slot"]),
]


@pytest.mark.parametrize("case, name, fragments", DATA_CASES, ids=[name for _, name, _ in DATA_CASES])
def test_bad_data_is_one_clear_line_and_nothing_is_published(case, name, fragments, tmp_path, reliability):
    out = user_output_dir(tmp_path)
    result = run_step("prepare_data.py", "--input", str(CORPUS / "data" / name), "--output-dir", str(out),
                      "--overwrite", check=False)
    line = error_line(result)
    assert_says(line, fragments)
    kept = assert_untouched(out)
    reliability.record(case, f"exit {result.returncode}: {readable(line, tmp_path)}; {kept}")


def test_a_non_utf8_byte_far_into_a_file_is_reported_on_its_own_line(tmp_path, reliability):
    """Past the text reader's first buffer (8 KB), where offsets used to be counted from the buffer."""
    rows = [json.dumps({"id": f"r-{i}", "dialogue": f"#Person1#: Hello {i}.\n#Person2#: Hi, how are you today?",
                        "summary": f"They greet {i}."}).encode() for i in range(500)]
    rows[399] = '{"id": "r-399", "dialogue": "#Person1#: Un caf\xe9?", "summary": "Coffee."}'.encode("latin-1")
    data = tmp_path / "long.jsonl"
    data.write_bytes(b"\n".join(rows) + b"\n")
    assert data.stat().st_size > 3 * 8192
    out = user_output_dir(tmp_path)
    result = run_step("prepare_data.py", "--input", str(data), "--output-dir", str(out), "--overwrite", check=False)
    line = error_line(result)
    column = rows[399].index(b"\xe9") + 1
    assert_says(line, [f"{data}:400: not UTF-8 (byte 0xe9 at column {column})", "re-encode the file as UTF-8"])
    reliability.record("data.non_utf8", f"byte 0xe9 on line 400 of a 33 KB file: exit {result.returncode}: "
                                        f"{readable(line, tmp_path)}; {assert_untouched(out)}")


def test_an_exact_repeat_is_dropped_and_a_test_dialogue_also_in_train_is_reported(tmp_path, reliability):
    """Not errors: a repeated example (same id, same fields) is dropped; train/test overlap is warned about."""
    repeated = run_step("prepare_data.py", "--input", str(CORPUS / "data" / "repeated_rows.jsonl"),
                        "--output-dir", str(tmp_path / "repeated"))
    dropped = next(line for line in repeated.stderr.splitlines() if line.startswith("warning: dropped"))
    assert "dropped 1 exact repeat(s)" in dropped and "'d-3' at" in dropped
    ids = [json.loads(line)["id"] for split in SPLITS
           for line in (tmp_path / "repeated" / f"{split}.jsonl").read_text().splitlines()]
    assert sorted(ids) == [f"d-{i}" for i in range(1, 7)]
    assert json.loads((tmp_path / "repeated" / DATA_CARD).read_text())["source"]["repeats_dropped"] == 1

    leak = run_step("prepare_data.py", "--input", str(CORPUS / "data" / "leak"), "--output-dir", str(tmp_path / "leak"))
    overlap = next(line for line in leak.stderr.splitlines() if "also in train" in line)
    assert_says(overlap, ["1 of 2 test dialogues are also in train (e.g. id 't-1')", "remove them from train"])
    assert json.loads((tmp_path / "leak" / DATA_CARD).read_text())["overlap_with_train"] == {"validation": 0, "test": 1}
    reliability.record("data.duplicate_ids", f"an exact repeat: exit {repeated.returncode}, {readable(dropped)}; "
                                             f"a test dialogue also in train: exit {leak.returncode}, {overlap}")


def test_facts_the_dialogue_states_are_kept_and_counted(tmp_path, reliability):
    """The refused file with its wrong fact corrected: prepared, the facts kept, the data card counts them."""
    lines = (CORPUS / "data" / "facts_value_not_in_dialogue.jsonl").read_text(encoding="utf-8").splitlines()
    fixed = [json.loads(line) for line in lines]
    fixed[2]["facts"]["day"] = "monday"   # the dialogue says Monday; case is not a mistake
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in fixed), encoding="utf-8")
    result = run_step("prepare_data.py", "--input", str(data), "--output-dir", str(tmp_path / "out"))
    card = json.loads((tmp_path / "out" / DATA_CARD).read_text())
    assert card["facts"] == {"examples": 3, "slots": ["amount", "day", "speakers", "time"]}
    kept = {row["id"]: row["facts"] for split in SPLITS
            for row in map(json.loads, (tmp_path / "out" / f"{split}.jsonl").read_text().splitlines())}
    assert kept == {row["id"]: row["facts"] for row in fixed}
    reliability.record("data.bad_facts", f"the same file with the fact corrected: exit {result.returncode}, facts "
                                         f"kept, data card: {card['facts']}")


def test_a_5_mb_dialogue_is_prepared_quickly_and_its_truncation_reported(tmp_path, reliability):
    turn = "#Person1#: I would like a table for two at seven tonight, please.\n#Person2#: Certainly, which name?\n"
    huge = (turn * (5_000_000 // len(turn) + 1))[:5_000_000]
    rows = [{"id": f"d-{i}", "dialogue": f"#Person1#: Can we meet on day {i}?\n#Person2#: Yes.",
             "summary": f"They meet on day {i}."} for i in range(30)]
    rows[7] = {"id": "huge", "dialogue": huge, "summary": "A very long booking call."}
    data = tmp_path / "huge.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    started = time.monotonic()
    result = run_step("prepare_data.py", "--input", str(data), "--output-dir", str(tmp_path / "out"))
    seconds = time.monotonic() - started
    warning = next(line for line in result.stderr.splitlines() if "'huge'" in line)
    assert "are longer than --max-source-length 512" in warning and "will be truncated" in warning
    card = json.loads((tmp_path / "out" / DATA_CARD).read_text())
    assert sum(card["truncated"][split]["source"] for split in SPLITS) == 1
    assert seconds < 30, f"{seconds:.1f} s for one 5 MB dialogue"
    reliability.record("data.huge_dialogue", f"exit {result.returncode} in {seconds:.1f} s: {warning}; the data card "
                                             "counts it as truncated", seconds=round(seconds, 1))


# ----------------------------------------------------------------------------- config and command line
CONFIG_CASES = [   # (case, file in bad_inputs/config, what the line must say)
    ("config.unknown_key", "unknown_key.yaml", ["unknown_key.yaml: parameters.LoraRnk", "at line 5",
                                                "did you mean LoraRank?", "allowed here: InputDataUri"]),
    ("config.unknown_key", "unknown_top_key.yaml", ["unknown_top_key.yaml: pipline_name", "at line 2",
                                                    "did you mean pipeline_name?"]),
    ("config.unknown_key", "unknown_setting.yaml", ["unknown_setting.yaml line 5: steps.finetune.max_step: "
                                                    "finetune_lora.py has no flag --max-step; did you mean max_steps?"]),
    ("config.wrong_type", "wrong_type.yaml", ["parameters.LoraRank: Input should be a valid integer",
                                              "(given 'sixteen') at line 4", "parameters.MinRougeL", "at line 5"]),
    ("config.rank_zero", "rank_zero.yaml", ["parameters.LoraRank: Input should be greater than or equal to 1",
                                            "(given 0) at line 4"]),
    ("config.rank_zero", "negative_steps.yaml", ["negative_steps.yaml: steps.finetune (finetune_lora.py): "
                                                 "--max-steps must be at least 1, got -5"]),
    ("config.temperature", "temperature_zero.yaml", ["steps.distill (distill.py): --temperature must be above 0, "
                                                     "got 0.0"]),
    ("config.sparsity", "sparsity_one.yaml", ["steps.prune (prune.py): --amount must be below 1 (it is the fraction "
                                              "removed), got 1.0"]),
    ("config.unknown_model", "unknown_model.yaml", ["parameters.BaseModelId: flan-t5-gigantic: not in the catalog and "
                                                    "no such path", "use one of flan-t5-small", "at line 4"]),
]


@pytest.mark.smoke
@pytest.mark.parametrize("case, name, fragments", CONFIG_CASES, ids=[name for _, name, _ in CONFIG_CASES])
def test_a_bad_config_is_refused_before_anything_runs(case, name, fragments, tmp_path, reliability):
    home, run_dir = tmp_path / "home", tmp_path / "run"
    result = flanops("run", "--config", str(CORPUS / "config" / name), "--output-dir", str(run_dir), home=home)
    line = error_line(result)
    assert_says(line, fragments)
    assert not home.exists(), "no embedded AWS may start for a config error"
    assert not run_dir.exists()
    reliability.record(case, f"flanops run --config {name}: exit 2: {readable(line)}; nothing started, no run folder")


STAGE_CASES = [   # (case, file in bad_inputs/stage, what the line must say)
    ("config.unknown_key", "unknown-key.json", ["unknown-key.json: instance_typ: Extra inputs are not permitted"]),
    ("config.wrong_type", "wrong-type.json", ["wrong-type.json: initial_instance_count: Input should be a valid "
                                              "integer", "(given 'two')"]),
]


@pytest.mark.parametrize("case, name, fragments", STAGE_CASES, ids=[name for _, name, _ in STAGE_CASES])
def test_a_bad_stage_file_is_refused_before_anything_deploys(case, name, fragments, tmp_path, reliability):
    home, template = tmp_path / "home", tmp_path / "template.json"
    result = flanops("deploy", "--stage", str(CORPUS / "stage" / name), "--dry-run", "--out", str(template), home=home)
    line = error_line(result)
    assert_says(line, fragments)
    assert not home.exists() and not template.exists()
    reliability.record(case, f"flanops deploy --stage {name}: exit 2: {readable(line)}; nothing started or written")


def test_a_flag_of_the_wrong_type_is_refused_by_the_command_line(tmp_path, reliability):
    result = flanops("serve", "--model-data", str(tmp_path / "model.tar.gz"), "--port", "eighty", home=tmp_path / "home")
    line = error_line(result)
    assert_says(line, ["flanops serve: error: argument --port: invalid int value: 'eighty'"])
    assert not (tmp_path / "home").exists()
    reliability.record("config.wrong_type", f"flanops serve --port eighty: exit 2: {line}")


class Started(Exception):
    """Raised where a run would connect to AWS: whatever was printed before did not stop it."""


@pytest.mark.parametrize("command", ["run", "start"])
def test_a_gate_no_model_can_pass_is_warned_about_and_the_run_goes_ahead(command, tmp_path, monkeypatch, capsys,
                                                                         reliability):
    from flanops.pipelines import cli, pipeline_commands

    def started(*args, **kwargs):
        raise Started

    monkeypatch.setenv("FLANOPS_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(pipeline_commands, "open_target", started)
    with pytest.raises(Started):
        cli.main([command, "--config", str(CORPUS / "config" / "unpassable_gate.yaml"), "--output-dir",
                  str(tmp_path / "run")])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert [warning.split()[1] for warning in warnings] == ["MinRougeL", "MaxP95LatencyMs", "MaxRougeLDrop"]
    assert_says(warnings[0], ["MinRougeL 0.99", "no summarizer reaches", "the gate will fail", "Lower it"])
    assert_says(warnings[1], ["MaxP95LatencyMs 0.5", "more than 1 ms with any model", "Raise it"])
    assert_says(warnings[2], ["MaxRougeLDrop 0 with OptimizationMethod quantize", "the fine-tuned model will be "
                              "registered", "Allow a small drop"])
    with pytest.raises(Started):   # thresholds a model can pass: no warning
        cli.main([command, "--output-dir", str(tmp_path / "run")])
    assert "warning:" not in capsys.readouterr().err
    named = ", ".join(warning.split()[1] for warning in warnings)
    reliability.record("config.unpassable_gate", f"flanops {command}: warned about {named}, then went ahead"
                       + (": " + " | ".join(warnings) if command == "run" else " (the same lines as flanops run)"))


# ----------------------------------------------------------------------------- model folders
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A cut-down T5 with random weights, saved as the pipeline saves models (test_model_archive's size)."""
    folder = tmp_path_factory.mktemp("tiny-t5") / "model"
    save_model(catalog.build_random_model(TINY_DIMS, seed=1), select_model.byte_level_tokenizer(), folder,
               {"base_model": "unit-test-base"})
    return folder


def _set_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def _foreign_weights(folder: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"bert.embeddings.word_embeddings.weight": np.zeros((384, 32), dtype=np.float32)},
              str(folder / "model.safetensors"))


def _cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


MODEL_CASES = {   # name → (case, how the copy of the tiny model is broken, what the line must say)
    "no-weights": ("model.missing_files", lambda d: (d / "model.safetensors").unlink(),
                   ["no weights (*.safetensors) found", "copy all of it again"]),
    "no-tokenizer": ("model.missing_files", lambda d: (d / "tokenizer_config.json").unlink(),
                     ["no tokenizer (tokenizer_config.json) found", "copy all of it again"]),
    "no-config": ("model.missing_files", lambda d: (d / "config.json").unlink(),
                  ["no config.json", "expected a folder written by select_model.py or save_pretrained"]),
    "bert-config": ("model.wrong_architecture", lambda d: _set_config(d, model_type="bert", architectures=["BertModel"]),
                    ["model_type 'bert' is not supported", "T5 family"]),
    "config-of-another-size": ("model.wrong_architecture", lambda d: _set_config(d, d_model=64),
                               ["config.json does not match the weights", "in model.safetensors, the t5 architecture "
                                "in config.json needs", "copy the whole model folder again"]),
    "weights-of-another-model": ("model.wrong_architecture", _foreign_weights,
                                 ["the weights lack", "tensors the t5 architecture in config.json needs (e.g. ",
                                  "copy the whole model folder again"]),
    "truncated-safetensors": ("model.corrupt_safetensors", lambda d: _cut_in_half(d / "model.safetensors"),
                              ["model.safetensors is not a readable safetensors file", "incomplete metadata",
                               "copy or download the model again"]),
    "garbage-safetensors": ("model.corrupt_safetensors",
                            lambda d: (d / "model.safetensors").write_bytes(b"\x00not safetensors" * 64),
                            ["model.safetensors is not a readable safetensors file", "copy or download the model again"]),
}


# Found only by comparing shapes, which needs torch: these run quantize.main in this process, where torch is
# loaded already (a process of their own would spend most of ten seconds importing it); the others fail
# before torch loads and run as their own process.
IN_PROCESS = {"config-of-another-size", "weights-of-another-model"}


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_a_broken_model_folder_is_one_clear_line(name, tiny_model, tmp_path, capsys, reliability):
    from flanops.steps import quantize
    from stepkit.errors import run_step as run_main

    case, breaks, fragments = MODEL_CASES[name]
    model_dir = shutil.copytree(tiny_model, tmp_path / name)
    breaks(model_dir)
    out = user_output_dir(tmp_path)
    argv = ["--model-dir", str(model_dir), "--method", "ct2-int8", "--output-dir", str(out), "--overwrite"]
    if name in IN_PROCESS:
        code = run_main(quantize.main, argv)
        result = subprocess.CompletedProcess(argv, code, *capsys.readouterr())
    else:
        result = run_step("quantize.py", *argv, check=False)
    line = error_line(result)
    assert_says(line, [f"--model-dir {model_dir}", *fragments])
    kept = assert_untouched(out)
    reliability.record(case, f"{name}: quantize.py exit {result.returncode}: {readable(line, tmp_path)}; {kept}")


ESCAPES = {   # name → an archive member that would land outside the folder it is unpacked into
    "dotdot": lambda tmp: _member("../escaped.txt"),
    "absolute": lambda tmp: _member(str(tmp / "escaped-absolute.txt")),
    "symlink": lambda tmp: _member("tokenizer.json", link=str(tmp / "escaped-link-target")),
}


def _member(name: str, link: str | None = None) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    if link:
        member.type, member.linkname = tarfile.SYMTYPE, link
    else:
        member.size = len(b"escaped\n")
    return member


@pytest.mark.parametrize("name", list(ESCAPES))
def test_a_model_tar_gz_whose_member_escapes_is_refused_before_anything_is_extracted(name, tiny_model, tmp_path,
                                                                                      reliability):
    """A folder holding model.tar.gz (as SageMaker hands a TrainingStep's model on), with one hostile member."""
    import io

    holder = tmp_path / "model"
    holder.mkdir()
    evil = ESCAPES[name](tmp_path)
    with tarfile.open(holder / MODEL_ARCHIVE, "w:gz") as tar:
        for path in sorted(tiny_model.iterdir()):
            tar.add(path, arcname=path.name)
        tar.addfile(evil, None if evil.issym() else io.BytesIO(b"escaped\n"))
    scratch = tmp_path / "tmp"   # extraction goes to a temporary folder: here, so that '..' would land in tmp_path
    scratch.mkdir()
    out = user_output_dir(tmp_path)
    result = run_step("quantize.py", "--model-dir", str(holder), "--method", "ct2-int8", "--output-dir", str(out),
                      "--overwrite", check=False, env={"TMPDIR": str(scratch)})
    line = error_line(result)
    assert_says(line, [f"{holder / MODEL_ARCHIVE}: archive member {evil.name!r}", "refusing it", "nothing was extracted",
                       "pack the model again from inside its folder"])
    assert not [path for path in tmp_path.rglob("escaped*")], "something was written outside the folder"
    assert not [path for path in scratch.rglob("*") if path.is_file()], "nothing may be extracted at all"
    kept = assert_untouched(out)
    reliability.record("model.tar_escape", f"{name}: quantize.py exit {result.returncode}: {readable(line, tmp_path)}; "
                                           f"nothing extracted anywhere; {kept}")


# ----------------------------------------------------------------------------- the endpoint
@pytest.fixture(scope="module")
def endpoint(tiny_model, tmp_path_factory):
    """The URL of ``flanops serve --model-data model.tar.gz`` (the tiny model packaged as the pipeline packages it)."""
    from flanops.infra.endpoint_client import serve_in_subprocess

    root = tmp_path_factory.mktemp("endpoint")
    archive = package_model(tiny_model, root / MODEL_ARCHIVE)
    env = {**without_aws(), "FLANOPS_HOME": str(root / "home"), "PYTHONUNBUFFERED": "1"}
    try:
        with serve_in_subprocess("--model-data", str(archive), "--endpoint-name", "bad-input", env=env) as url:
            yield url
    finally:
        subprocess.run([sys.executable, "-m", "flanops.pipelines.cli", "local", "stop"], env=env, capture_output=True, timeout=60)
        kill_processes_under(root)


def post(url: str, headers: dict[str, str], body: bytes | None) -> tuple[int, str]:
    """POST /invocations: (status, reply body). ``body`` None sends the headers alone, as a client about to send
    too much would."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        if body is None:
            connection.putrequest("POST", "/invocations")
            for name, value in headers.items():
                connection.putheader(name, value)
            connection.endheaders()
        else:
            connection.request("POST", "/invocations", body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8")
    finally:
        connection.close()


def _json(document) -> bytes:
    return json.dumps(document).encode()


DIALOGUE = "#Person1#: Can we meet at ten tomorrow?\n#Person2#: Yes, at the station."


def endpoint_cases() -> list[tuple[str, str, dict, bytes | None, int, list[str]]]:
    """(case, what, headers, body, status, what the error must say), with the limits the endpoint runs with."""
    from flanops.infra.serving import MAX_PAYLOAD_BYTES
    from flanops.steps.inference import MAX_BATCH_SIZE, MAX_NEW_TOKENS

    json_type = {"Content-Type": JSON_TYPE}
    return [
        ("endpoint.invalid_json", "a cut-off JSON body", json_type, b'{"inputs": "#Person1#: Hi', 400,
         ["the request body is not valid JSON", 'send {"inputs": "<dialogue>"}']),
        ("endpoint.content_type", "text/csv", {"Content-Type": "text/csv"}, b"dialogue\nHi", 415,
         ["content type 'text/csv' is not supported", "send application/json"]),
        ("endpoint.content_type", "application/xml", {"Content-Type": "application/xml"}, b"<inputs>Hi</inputs>", 415,
         ["content type 'application/xml' is not supported", "send application/json"]),
        ("endpoint.empty_body", "no body", json_type, b"", 400, ["the request body is empty", "send"]),
        ("endpoint.oversize_body", f"Content-Length {MAX_PAYLOAD_BYTES + 1:,}",
         {**json_type, "Content-Length": str(MAX_PAYLOAD_BYTES + 1)}, None, 413,
         [f"an endpoint takes at most {MAX_PAYLOAD_BYTES:,}", "send fewer dialogues"]),
        ("endpoint.huge_max_new_tokens", "max_new_tokens 1,000,000", json_type,
         _json({"inputs": DIALOGUE, "parameters": {"max_new_tokens": 1_000_000}}), 400,
         [f"max_new_tokens=1000000 is out of range; allowed: 1 to {MAX_NEW_TOKENS}", "FLANOPS_MAX_NEW_TOKENS"]),
        ("endpoint.non_string_inputs", "inputs a number", json_type, _json({"inputs": 42}), 400,
         ['"inputs" is a number', "must be a dialogue (a string) or a list of dialogues"]),
        ("endpoint.non_string_inputs", "an object in the list", json_type,
         _json({"inputs": [DIALOGUE, {"text": DIALOGUE}]}), 400, ['"inputs"[1] is an object']),
        ("endpoint.thousand_inputs", "1,000 dialogues", json_type, _json({"inputs": [DIALOGUE] * 1000}), 413,
         [f"1000 dialogues in one request; at most {MAX_BATCH_SIZE} are accepted",
          f"requests of up to {MAX_BATCH_SIZE}", "FLANOPS_MAX_BATCH_SIZE"]),
        ("config.temperature", "temperature 0 when sampling", json_type,
         _json({"inputs": DIALOGUE, "parameters": {"do_sample": True, "temperature": 0}}), 400,
         ["parameter temperature=0 is out of range; allowed: 0.01 to 2.0"]),
    ]


@pytest.mark.parametrize("index", range(len(endpoint_cases())), ids=[what for _, what, *_ in endpoint_cases()])
def test_a_bad_request_gets_a_4xx_that_says_why_and_the_endpoint_keeps_serving(index, endpoint, reliability):
    case, what, headers, body, expected_status, fragments = endpoint_cases()[index]
    started = time.monotonic()
    status, reply = post(endpoint, headers, body)
    milliseconds = (time.monotonic() - started) * 1000
    assert status == expected_status, reply
    message = json.loads(reply)["error"]
    assert_says(message, fragments)
    assert "Traceback" not in reply and "\n" not in message
    after, answer = post(endpoint, {"Content-Type": JSON_TYPE},
                         _json({"inputs": DIALOGUE, "parameters": {"max_new_tokens": 4}}))
    assert after == 200, answer
    assert len(json.loads(answer)) == 1
    reliability.record(case, f"{what}: HTTP {status} in {milliseconds:.0f} ms: {message}; the next request: HTTP {after}",
                       ms=round(milliseconds))
