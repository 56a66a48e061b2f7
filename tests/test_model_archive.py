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
from conftest import run_step

import select_model
from stepkit import catalog, modeling
from stepkit.errors import StepError
from stepkit.modeling import MODEL_ARCHIVE, check_model_dir, load_model_and_tokenizer, package_model, save_model

TINY_DIMS = catalog.T5Dims(d_model=32, d_ff=48, d_kv=8, num_heads=2, num_layers=1, num_decoder_layers=1, vocab_size=384)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-t5")
    save_model(catalog.build_random_model(TINY_DIMS, seed=1), select_model.byte_level_tokenizer(), folder,
               {"base_model": "unit-test-base", "method": "lora"})
    (folder / "code").mkdir()  # a nested folder, as the inference code will be
    (folder / "code" / "inference.py").write_text("def model_fn(model_dir):\n    return model_dir\n")
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


def test_package_roundtrip_keeps_every_file_at_the_archive_root(model_dir, packed):
    with tarfile.open(packed / MODEL_ARCHIVE) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names) and "config.json" in names and "code/inference.py" in names
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)
    resolved = check_model_dir(packed)
    assert resolved != packed and _files(resolved) == _files(model_dir)
    model, tokenizer = load_model_and_tokenizer(packed)
    assert model.config.d_model == TINY_DIMS.d_model and len(tokenizer) > 256


def test_package_is_byte_for_byte_reproducible(model_dir, tmp_path):
    first, second = package_model(model_dir, tmp_path / "a.tar.gz"), package_model(model_dir, tmp_path / "b.tar.gz")
    assert first.read_bytes() == second.read_bytes()
    header = first.read_bytes()[:10]
    assert header[4:8] == b"\0\0\0\0"  # gzip mtime 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.gz", "b.tar.gz"]  # no temporary files left


def test_extraction_happens_once_per_tarball(packed, monkeypatch):
    calls = []
    real = modeling.extract_safely
    monkeypatch.setattr(modeling, "extract_safely", lambda *a, **k: (calls.append(a), real(*a, **k)))
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
    import prune

    assert prune.main(["--model-dir", str(packed), "--method", "unstructured", "--amount", "0.5",
                       "--output-dir", str(tmp_path / "pruned")]) == 0
    card = json.loads((tmp_path / "pruned" / "model_card.json").read_text())
    assert card["base_model"] == "unit-test-base" and card["size"]["before"]["weights_bytes"] > 0
    assert select_model.main(["--model", str(packed), "--output-dir", str(tmp_path / "selected")]) == 0
    card = json.loads((tmp_path / "selected" / "model_card.json").read_text())
    assert card["base_model"] == "unit-test-base" and card["source_card"]["method"] == "lora"
