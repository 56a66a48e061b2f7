"""select_model.py: the catalog's figures, budget selection, and every kind of --model source."""
from __future__ import annotations

import io
import json
import tarfile
import tempfile
from pathlib import Path

import boto3
import pytest
from conftest import run_step
from moto import mock_aws

from flanops.steps import select_model
from stepkit import catalog
from stepkit.errors import StepError
from stepkit.errors import run_step as run_main
from stepkit.modelcard import read_model_card
from stepkit.modeling import load_model_and_tokenizer, save_model

# Published fp32 checkpoint sizes of google/flan-t5-* on the Hugging Face Hub (model.safetensors,
# or the sum of its shards), in bytes as the Hub rounds them. An independent check of the formula.
PUBLISHED_FP32_BYTES = {
    "flan-t5-small": 307_867_048,  # exact, from a Git LFS pointer (includes a small JSON header)
    "flan-t5-base": 990e6,
    "flan-t5-large": 3.13e9,
    "flan-t5-xl": 9.45e9 + 1.95e9,
    "flan-t5-xxl": 9.99e9 + 9.93e9 + 10e9 + 10e9 + 4.62e9,
}
SMALL_DIMS = catalog.T5Dims(d_model=32, d_ff=48, d_kv=8, num_heads=2, num_layers=2, num_decoder_layers=2, vocab_size=384)


# ---------------------------------------------------------------- catalog


@pytest.mark.parametrize("entry", catalog.FAMILY, ids=lambda e: e.name)
def test_catalog_parameter_count_matches_a_real_t5_module(entry):
    model = catalog.build_random_model(entry, device="meta")
    assert sum(p.numel() for p in model.parameters()) == entry.parameters
    assert model.lm_head.weight is not model.shared.weight  # Flan-T5's head is untied
    assert model.config.d_ff == entry.dims.d_ff and model.config.num_heads == entry.dims.num_heads


@pytest.mark.parametrize("entry", catalog.FAMILY, ids=lambda e: e.name)
def test_catalog_size_matches_the_published_checkpoint(entry):
    fp32_bytes = entry.dims.weights_bytes("float32")
    assert abs(fp32_bytes - PUBLISHED_FP32_BYTES[entry.name]) / PUBLISHED_FP32_BYTES[entry.name] < 0.005
    assert entry.dims.weights_bytes("bfloat16") * 2 == fp32_bytes


def test_catalog_counts_read_as_usually_quoted():
    quoted = {e.name: catalog.human_count(e.parameters) for e in catalog.FAMILY}
    assert quoted == {"flan-t5-small": "77M", "flan-t5-base": "248M", "flan-t5-large": "783M",
                      "flan-t5-xl": "2.85B", "flan-t5-xxl": "11.1B"}


def test_catalog_recommends_known_instances_with_room_for_the_model():
    for entry in catalog.FAMILY:
        for name in (entry.train_instance, entry.inference_instance):
            assert name in catalog.INSTANCES
        # Even in float32 (weights x 1.2 for serving) the recommended endpoint holds the model.
        _, fails = catalog.budget_check(entry.parameters, catalog.Budget(inference_instance=entry.inference_instance))
        assert fails == []
    # ... and the next smaller GPU instance would not hold xxl: the recommendation is not oversized.
    _, fails = catalog.budget_check(catalog.CATALOG["flan-t5-xxl"].parameters, catalog.Budget(inference_instance="ml.g5.8xlarge"))
    assert fails


def test_lookup_accepts_short_names_and_hub_ids():
    assert catalog.lookup("flan-t5-base") is catalog.lookup("google/flan-t5-base") is catalog.CATALOG["flan-t5-base"]
    assert catalog.lookup("tiny") is catalog.TINY
    assert catalog.lookup("t5-base") is None


# ---------------------------------------------------------------- budget selection


@pytest.mark.parametrize("budget, chosen", [
    (catalog.Budget(max_params=300_000_000), "flan-t5-base"),
    (catalog.Budget(max_params=catalog.parse_count("1B")), "flan-t5-large"),
    (catalog.Budget(max_memory_gib=1.0), "flan-t5-base"),  # 0.92 GiB fp32
    (catalog.Budget(max_memory_gib=1.5, dtype="bfloat16"), "flan-t5-large"),  # 1.46 GiB in bf16, 2.92 in fp32
    (catalog.Budget(inference_instance="ml.g5.xlarge"), "flan-t5-xl"),  # 12.7 GiB to serve <= 24
    (catalog.Budget(inference_instance="ml.g5.12xlarge", dtype="bfloat16"), "flan-t5-xxl"),
    (catalog.Budget(max_params=300_000_000, inference_instance="ml.g5.12xlarge"), "flan-t5-base"),
], ids=str)
def test_budget_chooses_the_largest_size_that_fits(budget, chosen):
    entry, reason = catalog.choose_by_budget(budget)
    assert entry.name == chosen
    assert reason.startswith(f"chose {entry.hub_id}: ")


def test_budget_reason_says_why_and_names_the_next_size():
    _, reason = catalog.choose_by_budget(catalog.Budget(max_params=catalog.parse_count("300M")))
    assert reason == ("chose google/flan-t5-base: 248M params ≤ 300M budget; "
                      "flan-t5-large (783M) does not fit: 783M params > 300M budget")


def test_budget_that_nothing_fits_is_a_clear_error():
    with pytest.raises(StepError, match="no Flan-T5 size fits.*77M params > 10M budget"):
        catalog.choose_by_budget(catalog.Budget(max_params=10_000_000))


def test_budget_cli_prints_the_choice_and_why(tmp_path):
    result = run_step("select_model.py", "--max-params", "300M", "--dry-run", "--output-dir", str(tmp_path / "out"))
    assert "chose google/flan-t5-base: 248M params ≤ 300M budget" in result.stdout
    assert "flan-t5-large (783M) does not fit" in result.stdout
    assert not (tmp_path / "out").exists()


def test_named_model_over_budget_is_refused_with_the_size_that_fits(tmp_path, capsys):
    args = ["--model", "flan-t5-xxl", "--inference-instance", "ml.g5.xlarge", "--output-dir", str(tmp_path / "out")]
    assert run_main(select_model.main, args) == 2
    err = capsys.readouterr().err
    assert "google/flan-t5-xxl does not fit the budget" in err and "largest Flan-T5 size that fits is flan-t5-xl" in err
    assert not (tmp_path / "out").exists()


def test_list_and_help():
    listing = run_step("select_model.py", "--list").stdout
    for entry in catalog.FAMILY:
        assert entry.hub_id in listing and catalog.human_count(entry.parameters) in listing
    assert "ml.p4d.24xlarge" in listing and "tiny" in listing
    assert "--inference-instance" in run_step("select_model.py", "--help").stdout


# ---------------------------------------------------------------- random weights


def test_random_weights_small_end_to_end_writes_a_loadable_folder(tmp_path):
    out = tmp_path / "model"
    run_step("select_model.py", "--model", "flan-t5-small", "--random-weights", "--output-dir", str(out))
    model, tokenizer = load_model_and_tokenizer(out)
    expected = catalog.CATALOG["flan-t5-small"].parameters
    assert sum(p.numel() for p in model.parameters()) == expected
    card = read_model_card(out)
    assert card["parameters"] == expected and card["base_model"] == "google/flan-t5-small"
    assert card["weights"] == "random" and card["benchmark_only"] is True and "benchmark" in card["note"]
    assert card["architecture"]["tie_word_embeddings"] is False and card["architecture"]["d_ff"] == 1024
    assert card["recommended_instances"]["inference"] == "ml.m5.xlarge"
    assert card["memory_gib"]["weights_float32"] == pytest.approx(expected * 4 / 2**30, abs=1e-3)
    # The stand-in tokenizer round-trips any text and the model runs on it.
    ids = tokenizer("#Person1#: Grüße, 5 $", return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == "#Person1#: Grüße, 5 $"
    assert model.generate(ids, max_new_tokens=2).shape[1] >= 2


def test_random_weights_refuse_a_size_that_does_not_fit_in_memory(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(catalog, "available_memory_bytes", lambda: 2 * catalog.GIB)
    args = ["--model", "flan-t5-large", "--random-weights", "--output-dir", str(tmp_path / "out")]
    assert run_main(select_model.main, args) == 2
    err = capsys.readouterr().err
    assert "needs about 4.5 GiB" in err and "--dtype bfloat16" in err and "2.0 GiB is available" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- local folders and archives


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory) -> Path:
    """A cut-down T5 saved the way the pipeline saves models, with a card naming its base."""
    folder = tmp_path_factory.mktemp("small-t5")
    model = catalog.build_random_model(SMALL_DIMS, seed=1)
    save_model(model, select_model.byte_level_tokenizer(), folder, {"base_model": "unit-test-base"})
    return folder


def test_local_folder_is_selected_by_path(small_model_dir, tmp_path):
    out = tmp_path / "out"
    assert select_model.main(["--model", str(small_model_dir), "--output-dir", str(out)]) == 0
    card = read_model_card(out)
    assert card["source"] == {"kind": "local", "uri": str(small_model_dir)}
    assert card["base_model"] == "unit-test-base"
    assert card["parameters"] == SMALL_DIMS.parameters
    assert card["recommended_instances"]["basis"].endswith("flan-t5-small or smaller")
    model, _ = load_model_and_tokenizer(out)
    assert sum(p.numel() for p in model.parameters()) == SMALL_DIMS.parameters


@pytest.mark.parametrize("make_folder, message", [
    (lambda d: None, "no config.json"),
    (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]})),
     "model_type 'bert' is not supported"),
], ids=["no-config", "bert-config"])
def test_bad_local_folders_are_clear_errors(tmp_path, capsys, make_folder, message):
    folder = tmp_path / "candidate"
    folder.mkdir()
    make_folder(folder)
    assert run_main(select_model.main, ["--model", str(folder), "--output-dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_id, message", [
    ("bert-base-uncased", "not in the catalog and no such path"),
    ("someone/flan-t5-finetuned", "not a Flan-T5 catalog id"),
    ("huggingface-text2text-flan-t5-base", "JumpStart model id"),
])
def test_unknown_ids_are_clear_errors(tmp_path, capsys, reliability, model_id, message):
    code = run_main(select_model.main, ["--model", model_id, "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "flan-t5-base" in err
    assert not (tmp_path / "out").exists()
    reliability.record("config.unknown_model", f"select_model.py --model {model_id}: exit {code}: {err.strip()}")


@pytest.mark.parametrize("args", [("--model", "flan-t5-small", "--random-weights", "--pretrain-steps", "5"),
                                  ("--model", "tiny", "--pretrain-steps", "0")])
def test_pretrain_steps_is_refused_where_it_cannot_apply(tmp_path, capsys, args):
    code = run_main(select_model.main, [*args, "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "--pretrain-steps" in err and "--model tiny" in err, err
    assert not (tmp_path / "out").exists()


def test_hub_id_offline_is_one_clear_line(tmp_path):
    out = tmp_path / "out"
    result = run_step("select_model.py", "--model", "google/flan-t5-small", "--output-dir", str(out), check=False,
                      env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert "Hugging Face Hub is unreachable" in error_lines[0]
    assert "--model tiny" in error_lines[0] and "--random-weights" in error_lines[0]
    assert not out.exists()


def _tarball(path: Path, folder: Path | None = None, extra: list[tarfile.TarInfo] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        if folder:
            for file in sorted(folder.iterdir()):
                tar.add(file, arcname=file.name)
        for member in extra or []:
            tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isfile() else None)
    return path


def _evil(name: str = "../evil") -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.size = 1
    return member


def _link(name: str = "config.json", target: str = "/etc/passwd") -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type = tarfile.SYMTYPE
    member.linkname = target
    return member


@pytest.mark.parametrize("member, message", [
    (_evil("../evil"), "outside"), (_evil("/tmp/evil-absolute"), "outside"), (_link(), "is a link"),
], ids=["dotdot", "absolute", "symlink"])
def test_archive_members_that_escape_or_link_are_rejected_before_extracting(tmp_path, member, message):
    archive = _tarball(tmp_path / "model.tar.gz", extra=[_evil("ok.txt"), member])
    destination = tmp_path / "extract" / "here"
    with pytest.raises(StepError, match=message):
        select_model.extract_safely(archive, destination, label="test")
    assert list(destination.iterdir()) == []  # not even the harmless member was written
    assert not (tmp_path / "extract" / "evil").exists()


def test_local_model_tarball_with_a_wrapping_folder(small_model_dir, tmp_path):
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(small_model_dir, arcname="model")  # some archives wrap the files in one folder
    out = tmp_path / "out"
    assert select_model.main(["--model", str(archive), "--output-dir", str(out)]) == 0
    assert read_model_card(out)["parameters"] == SMALL_DIMS.parameters


# ---------------------------------------------------------------- S3 (moto)


@pytest.fixture
def s3(monkeypatch, tmp_path, fake_aws_credentials):
    # Downloads go under tmp_path, so a test can see that nothing escaped the work folder.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "work"))
    (tmp_path / "work").mkdir()
    with mock_aws():
        client = boto3.client("s3")
        client.create_bucket(Bucket="models")
        yield client


def _upload_folder(client, folder: Path, prefix: str) -> None:
    for file in folder.iterdir():
        client.upload_file(str(file), "models", prefix + file.name)


def test_s3_folder_prefix(s3, small_model_dir, tmp_path):
    _upload_folder(s3, small_model_dir, "base/v1/")
    out = tmp_path / "out"
    assert select_model.main(["--model", "s3://models/base/v1/", "--output-dir", str(out)]) == 0
    card = read_model_card(out)
    assert card["source"] == {"kind": "s3", "uri": "s3://models/base/v1/"}
    assert card["parameters"] == SMALL_DIMS.parameters and card["base_model"] == "unit-test-base"
    load_model_and_tokenizer(out)


@pytest.mark.parametrize("uri", ["s3://models/artifacts/model.tar.gz", "s3://models/artifacts"])
def test_s3_model_tarball_or_prefix_holding_one(s3, small_model_dir, tmp_path, uri):
    s3.upload_file(str(_tarball(tmp_path / "model.tar.gz", small_model_dir)), "models", "artifacts/model.tar.gz")
    out = tmp_path / "out"
    assert select_model.main(["--model", uri, "--output-dir", str(out)]) == 0
    assert read_model_card(out)["parameters"] == SMALL_DIMS.parameters


def test_s3_tarball_with_an_escaping_member_is_rejected(s3, small_model_dir, tmp_path, capsys):
    archive = _tarball(tmp_path / "model.tar.gz", small_model_dir, extra=[_evil("../evil")])
    s3.upload_file(str(archive), "models", "bad/model.tar.gz")
    out = tmp_path / "out"
    assert run_main(select_model.main, ["--model", "s3://models/bad/model.tar.gz", "--output-dir", str(out)]) == 2
    assert "'../evil' would be written outside" in capsys.readouterr().err
    assert not out.exists()
    assert not any(path.name == "evil" for path in tmp_path.rglob("*"))


@pytest.mark.parametrize("uri, message", [
    ("s3://models/missing/", "no objects under s3://models/missing/"),
    ("s3://no-such-bucket/x/", "NoSuchBucket"),
])
def test_s3_missing_prefix_or_bucket_is_a_clear_error(s3, tmp_path, capsys, uri, message):
    assert run_main(select_model.main, ["--model", uri, "--output-dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- tiny


def test_tiny_end_to_end(tmp_path):
    """--pretrain-steps builds the stand-in from the pretraining corpus: a few steps keep this quick."""
    out = tmp_path / "out"
    run_step("select_model.py", "--model", "tiny", "--pretrain-steps", "3", "--output-dir", str(out))
    card = read_model_card(out)
    assert card["base_model"] == "tiny" and card["source"]["kind"] == "tiny"
    model, tokenizer = load_model_and_tokenizer(out)
    assert card["parameters"] == sum(p.numel() for p in model.parameters())
    assert card["architecture"]["vocab_size"] == model.config.vocab_size
