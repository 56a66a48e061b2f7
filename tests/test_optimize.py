"""optimize.py: one entry script for the distill/quantize/prune branches; a branch not chosen writes SKIPPED.json."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import run_step

from flanops.steps import optimize
from flanops.steps import select_model
from stepkit import catalog
from stepkit.archive import MODEL_ARCHIVE
from stepkit.contract import SKIPPED_MARKER, skipped_reason
from stepkit.errors import run_step as run_main
from stepkit.modeling import save_model
from stepkit.packaging import package_model

TINY_DIMS = catalog.T5Dims(d_model=32, d_ff=48, d_kv=8, num_heads=2, num_layers=1, num_decoder_layers=1, vocab_size=384)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-t5")
    save_model(catalog.build_random_model(TINY_DIMS, seed=1), select_model.byte_level_tokenizer(), folder,
               {"base_model": "unit-test-base"})
    return folder


@pytest.mark.parametrize("variant, method", [("prune", "quantize"), ("distill", "none"), ("quantize", "prune")])
def test_branch_not_chosen_writes_only_the_marker(tmp_path, capsys, variant, method):
    out = tmp_path / variant
    # The step's own arguments are passed through untouched; a skipped branch reads only --output-dir.
    argv = ["--variant", variant, "--method", method, "--", "--model-dir", str(tmp_path / "absent"),
            "--method", "structured", "--output-dir", str(out)]
    assert run_main(optimize.main, argv) == 0
    assert sorted(p.name for p in out.iterdir()) == [SKIPPED_MARKER, "_SUCCESS"]  # no model
    record = json.loads((out / SKIPPED_MARKER).read_text())
    assert record["variant"] == variant and record["method"] == method and record["reason"]
    assert skipped_reason(out) == record["reason"]
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"skipped {variant}:") and str(out) in line


def test_skipped_output_defaults_to_the_steps_own_output_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SM_MODEL_DIR", str(tmp_path / "sm-model"))  # where a TrainingStep's model goes
    assert run_main(optimize.main, ["--variant", "distill", "--method", "quantize", "--"]) == 0
    assert (tmp_path / "sm-model" / SKIPPED_MARKER).is_file()


def test_skipped_marker_is_found_inside_model_tar_gz(tmp_path):
    out = tmp_path / "skipped"
    assert run_main(optimize.main, ["--variant", "prune", "--method", "none", "--", "--output-dir", str(out)]) == 0
    uploaded = tmp_path / "uploaded"  # a TrainingStep's output, as the next job receives it
    uploaded.mkdir()
    package_model(out, uploaded / MODEL_ARCHIVE)
    assert skipped_reason(uploaded) == "--method none: no optimization was chosen"


def test_real_model_folders_are_not_skipped(model_dir, tmp_path):
    assert skipped_reason(model_dir) is None
    packed = tmp_path / "packed"
    packed.mkdir()
    package_model(model_dir, packed / MODEL_ARCHIVE)
    assert skipped_reason(packed) is None


def test_chosen_branch_runs_the_step(model_dir, tmp_path):
    out = tmp_path / "quantized"
    result = run_step("optimize.py", "--variant", "quantize", "--method", "quantize", "--",
                      "--model-dir", str(model_dir), "--method", "fp16", "--output-dir", str(out),
                      env={"SM_NUM_CPUS": "1"})
    assert "running quantize (--method quantize)" in result.stdout and "quantize fp16" in result.stdout
    assert (out / "model.safetensors").is_file() and not (out / SKIPPED_MARKER).exists()
    assert json.loads((out / "model_card.json").read_text())["quantization"]["method"] == "fp16"


def test_auto_runs_every_branch(model_dir, tmp_path, capsys):
    out = tmp_path / "quantized"  # in process (the subprocess case is above): quick
    argv = ["--variant", "quantize", "--method", "auto", "--", "--model-dir", str(model_dir), "--method", "bf16",
            "--output-dir", str(out)]
    assert run_main(optimize.main, argv) == 0
    assert "running quantize (--method auto)" in capsys.readouterr().out
    assert json.loads((out / "model_card.json").read_text())["quantization"]["method"] == "bf16"
    # in process, the branch is this package's quantize.py, not a second copy under its bare name
    assert "flanops.steps.quantize" in sys.modules and "quantize" not in sys.modules


@pytest.mark.parametrize("argv, message", [
    (["--variant", "quantize", "--method", "int8"], "--method 'int8' is not known; choose one of none, distill"),
    (["--variant", "lora", "--method", "auto"], "--variant 'lora' is not known"),
    (["--variant", "prune", "--method", "auto", "--model-dir", "x"], "go after --"),
])
def test_bad_arguments_are_clear_errors(tmp_path, argv, message):
    result = run_step("optimize.py", *argv, "--", "--output-dir", str(tmp_path / "out"), check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_step_errors_pass_through(tmp_path):
    result = run_step("optimize.py", "--variant", "quantize", "--method", "auto", "--", "--model-dir",
                      str(tmp_path / "absent"), "--method", "fp16", "--output-dir", str(tmp_path / "out"), check=False)
    assert result.returncode == 2 and "no such folder" in result.stderr and "Traceback" not in result.stderr
