"""Model folders given as SageMaker's model.tar.gz: package_model writes one, check_model_dir reads one.

A TrainingStep's model reaches later Processing jobs as a folder holding only model.tar.gz; every
step that takes a model folder must accept that. The models here are cut-down random T5s (fast).
"""
from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest
from conftest import STEPS, run_step

from flanops.steps import select_model
from stepkit import archive, catalog
from stepkit.archive import MODEL_ARCHIVE, pack_folder
from stepkit.errors import StepError
from stepkit.modelcheck import check_model_dir
from stepkit.modeling import load_model_and_tokenizer, save_model
from stepkit.packaging import package_model

TINY_DIMS = catalog.T5Dims(d_model=32, d_ff=48, d_kv=8, num_heads=2, num_layers=1, num_decoder_layers=1, vocab_size=384)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-t5")
    save_model(catalog.build_random_model(TINY_DIMS, seed=1), select_model.byte_level_tokenizer(), folder,
               {"base_model": "unit-test-base", "method": "lora"})
    # What steps leave beside a model, none of which belongs in the served artifact.
    for leftover in ("_SUCCESS", "training_curve.json", "adapter/adapter_config.json", "checkpoint-10/trainer_state.json",
                     "code/inference.py"):  # an older handler, as in a model extracted from an earlier artifact
        (folder / leftover).parent.mkdir(exist_ok=True)
        (folder / leftover).write_text("{}\n")
    return folder


@pytest.fixture
def packed(model_dir, tmp_path) -> Path:
    """A folder holding only model.tar.gz, as a Processing job receives a TrainingStep's model."""
    folder = tmp_path / "input-model"
    folder.mkdir()
    package_model(model_dir, folder / MODEL_ARCHIVE)
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_package_is_the_model_plus_its_serving_code_in_sagemakers_layout(model_dir, packed):
    with tarfile.open(packed / MODEL_ARCHIVE) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)
    packed_files, source = _files(check_model_dir(packed)), _files(model_dir)
    model_files = {"config.json", "generation_config.json", "model.safetensors", "model_card.json", "tokenizer.json",
                   "tokenizer_config.json"}
    assert {name for name in packed_files if not name.startswith("code/")} == model_files
    assert all(packed_files[name] == source[name] for name in model_files - {"config.json", "tokenizer_config.json"})
    code = {name.removeprefix("code/") for name in packed_files if name.startswith("code/")}
    stepkit = {f"stepkit/{p.relative_to(STEPS / 'stepkit').as_posix()}" for p in (STEPS / "stepkit").glob("*.py")}
    assert code == {"inference.py", "requirements.txt", *stepkit}  # no __pycache__
    assert packed_files["code/inference.py"] == (STEPS / "inference.py").read_bytes()  # the older one replaced
    requirements = packed_files["code/requirements.txt"].decode().splitlines()
    assert requirements and all(line.startswith("#") or not line.strip() for line in requirements)  # the image has them
    model, tokenizer = load_model_and_tokenizer(packed)
    assert model.config.d_model == TINY_DIMS.d_model and len(tokenizer) > 256


def test_configs_are_packed_in_a_form_transformers_4_reads_too(model_dir, packed):
    """transformers 5's list of extra special tokens and its tokenizer class name break 4.x (see portable_config);
    the artifact is served by transformers 4.51.3 (test_inference_handler.py runs it)."""
    extracted = check_model_dir(packed)
    written = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert isinstance(written["extra_special_tokens"], list) and written["tokenizer_class"] == "TokenizersBackend"
    portable = json.loads((extracted / "tokenizer_config.json").read_text())
    assert "extra_special_tokens" not in portable and portable["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert portable["additional_special_tokens"] == written["extra_special_tokens"]
    assert {k: v for k, v in portable.items() if k not in ("additional_special_tokens", "tokenizer_class")} == \
        {k: v for k, v in written.items() if k not in ("extra_special_tokens", "tokenizer_class")}
    config = json.loads((extracted / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "float32"
    assert {k: v for k, v in config.items() if k != "torch_dtype"} == json.loads((model_dir / "config.json").read_text())
    _, tokenizer = load_model_and_tokenizer(packed)
    _, original = load_model_and_tokenizer(model_dir)
    text = "Summarize: <extra_id_3> café\n#Person1#: hi"
    assert tokenizer(text).input_ids == original(text).input_ids and len(tokenizer) == len(original)


def test_package_is_byte_for_byte_reproducible(model_dir, packed, tmp_path):
    first, second = package_model(model_dir, tmp_path / "a.tar.gz"), package_model(model_dir, tmp_path / "b.tar.gz")
    assert first.read_bytes() == second.read_bytes()
    header = first.read_bytes()[:10]
    assert header[4:8] == b"\0\0\0\0"  # gzip mtime 0
    repacked = package_model(check_model_dir(packed), tmp_path / "c.tar.gz")  # an extracted artifact, packed again
    assert repacked.read_bytes() == first.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.gz", "b.tar.gz", "c.tar.gz", "input-model"]  # no temporary files left


def test_a_folder_without_a_model_is_packed_as_it_is(tmp_path):
    folder = tmp_path / "skipped"  # optimize.py's output for a branch it did not run
    folder.mkdir()
    (folder / "SKIPPED.json").write_text('{"reason": "not chosen"}')
    (folder / "_SUCCESS").write_text("")
    with tarfile.open(package_model(folder, tmp_path / MODEL_ARCHIVE)) as tar:
        assert tar.getnames() == ["SKIPPED.json", "_SUCCESS"]


def test_pack_folder_keeps_everything_as_a_training_job_output(model_dir, tmp_path):
    with tarfile.open(pack_folder(model_dir, tmp_path / MODEL_ARCHIVE)) as tar:
        tar.extractall(tmp_path / "out", filter="data")
    assert _files(tmp_path / "out") == _files(model_dir)  # adapter/, curve, _SUCCESS and all


def test_extraction_happens_once_per_tarball(packed, monkeypatch):
    calls = []
    real = archive.extract_safely
    monkeypatch.setattr(archive, "extract_safely", lambda *a, **k: (calls.append(a), real(*a, **k)))
    first = check_model_dir(packed)
    load_model_and_tokenizer(packed)  # what prune.py does after its own check
    assert check_model_dir(packed) == first
    assert len(calls) == 1


def _archive_with(folder: Path, member: tarfile.TarInfo, data: bytes = b"x") -> Path:
    folder.mkdir()
    with tarfile.open(folder / MODEL_ARCHIVE, "w:gz") as tar:
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return folder


@pytest.mark.parametrize("name, kind, link", [
    ("../escaped.txt", tarfile.REGTYPE, ""),
    ("/tmp/absolute-escape.txt", tarfile.REGTYPE, ""),
    ("config.json", tarfile.SYMTYPE, "/etc/passwd"),
], ids=["dotdot", "absolute", "symlink-out"])
def test_unsafe_members_are_refused(tmp_path, name, kind, link):
    member = tarfile.TarInfo(name)
    member.type, member.linkname, member.size = kind, link, 1 if kind == tarfile.REGTYPE else 0
    folder = _archive_with(tmp_path / "model", member)
    with pytest.raises(StepError) as caught:
        check_model_dir(folder)
    assert str(folder / MODEL_ARCHIVE) in str(caught.value) and "refusing" in str(caught.value)
    assert not (tmp_path / "escaped.txt").exists()


def test_corrupt_tarball_is_an_error_naming_the_file(model_dir, tmp_path):
    folder = tmp_path / "cut"
    folder.mkdir()
    whole = package_model(model_dir, tmp_path / "whole.tar.gz").read_bytes()
    (folder / MODEL_ARCHIVE).write_bytes(whole[: len(whole) // 2])
    with pytest.raises(StepError, match=r"model\.tar\.gz: not a readable tar archive"):
        check_model_dir(folder, "--model-dir")
    (folder / MODEL_ARCHIVE).write_bytes(gzip.compress(b"not a tar file at all" * 40))
    with pytest.raises(StepError, match=str(folder / MODEL_ARCHIVE)):
        check_model_dir(folder)


def test_archive_without_a_model_says_so(tmp_path):
    member = tarfile.TarInfo("notes.txt")
    member.size = 1
    folder = _archive_with(tmp_path / "model", member)
    with pytest.raises(StepError, match="no config.json"):
        check_model_dir(folder, "--model-dir")


def test_quantize_accepts_a_folder_holding_model_tar_gz(model_dir, packed, tmp_path):
    out = tmp_path / "fp16"
    result = run_step("quantize.py", "--model-dir", str(packed), "--method", "fp16", "--output-dir", str(out),
                      env={"SM_NUM_CPUS": "1"})
    assert "fp16" in result.stdout and (out / "_SUCCESS").is_file()
    card = json.loads((out / "model_card.json").read_text())
    assert card["source_model_dir"] == str(packed)  # the folder given, not the temporary extraction
    assert card["base_model"] == "unit-test-base" and card["source_method"] == "lora"  # the card inside the tarball
    before = (model_dir / "model.safetensors").stat().st_size
    assert card["size_on_disk_bytes"]["before"] == before  # measured on the extracted weights
    assert card["size_on_disk_bytes"]["after"] < before


def test_prune_and_select_model_read_the_card_inside_the_tarball(packed, tmp_path):
    from flanops.steps import prune

    assert prune.main(["--model-dir", str(packed), "--method", "unstructured", "--amount", "0.5",
                       "--output-dir", str(tmp_path / "pruned")]) == 0
    card = json.loads((tmp_path / "pruned" / "model_card.json").read_text())
    assert card["base_model"] == "unit-test-base" and card["size"]["before"]["weights_bytes"] > 0
    assert select_model.main(["--model", str(packed), "--output-dir", str(tmp_path / "selected")]) == 0
    card = json.loads((tmp_path / "selected" / "model_card.json").read_text())
    assert card["base_model"] == "unit-test-base" and card["source_card"]["method"] == "lora"
