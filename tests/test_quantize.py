"""quantize.py: fp16/bf16 casts and int8 (dynamic, static) artifacts that are smaller on disk,
load back in a fresh process through stepkit.modeling, and stay close to the fp32 model.

The artifacts are made once per module from the chain's LoRA fine-tuned tiny model; one fresh
process then loads each of them, as evaluate.py and inference do, and reports what it got.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import STEPS, run_step
from test_inference_handler import assert_artifacts_serve

QUALITY_EXAMPLES = 50
# One torch thread per process: the tiny model gains nothing from more, and on a shared machine
# (CI runners, developers' boxes) OpenMP threads waiting for a busy core made runs 5-10x slower.
ONE_THREAD = {"SM_NUM_CPUS": "1"}
CALIBRATION_SIZE = "8"  # the CLI default is 64; 8 keeps the histogram observers' pass short in CI
ROUGE_TOLERANCE = 0.02  # ROUGE-L fraction: 2 points
# int8-static is also held to logit-level bounds (teacher-forced on the test references), which are far
# less noisy than ROUGE on 50 examples. Measured on the tiny model: relative L2 error 0.015-0.017 and
# 99% same next token, for dynamic and for static with 8 to 64 calibration examples. Broken calibration
# fails them: a halved input range (clipping) gave 0.078 / 94.8%, a zero point of 0 gave 0.73 / 32%.
MAX_RELATIVE_LOGIT_ERROR = 0.05
MIN_NEXT_TOKEN_AGREEMENT = 0.97

# Runs in a fresh interpreter: load each folder through load_model_and_tokenizer, generate, and
# compare teacher-forced logits with the first folder's (the fp32 model). Prints one JSON object.
RELOAD_SCRIPT = r"""
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
from stepkit.metrics import rouge
from stepkit.modeling import configure_runtime, load_model_and_tokenizer, summarize
from stepkit.records import read_split
from stepkit.training import encode_records

configure_runtime()
data_dir, examples, reference_dir = sys.argv[2], int(sys.argv[3]), sys.argv[4]
full, short = sys.argv[5].split(","), sys.argv[6].split(",")
rows = read_split(data_dir, "test")[:examples]
report, reference_logits = {}, None
for folder in [reference_dir] + full + short:
    model, tokenizer = load_model_and_tokenizer(folder)
    kind = lambda module: f"{type(module).__module__}.{type(module).__name__}"
    entry = {"dtype": str(model.dtype), "module_types": sorted({kind(m) for m in model.modules()}),
             "wo_type": kind(model.encoder.block[0].layer[1].DenseReluDense.wo),
             "q_type": kind(model.encoder.block[0].layer[0].SelfAttention.q)}
    if folder in short:  # half precision is slow on CPU: a few examples show it loads and generates
        entry["summaries"] = summarize(model, tokenizer, [r["dialogue"] for r in rows[:2]], max_new_tokens=8)
        report[folder] = entry
        continue
    summaries = summarize(model, tokenizer, [r["dialogue"] for r in rows])
    entry["rougeL"] = rouge(summaries, [r["references"] for r in rows])["rougeL"]
    encoded = encode_records(tokenizer, rows, 512, 128).features  # one padded batch; compared where labels are real
    width, length = max(len(f["input_ids"]) for f in encoded), max(len(f["labels"]) for f in encoded)
    pad = lambda values, size, fill: values + [fill] * (size - len(values))
    batch = {"input_ids": torch.tensor([pad(f["input_ids"], width, tokenizer.pad_token_id) for f in encoded]),
             "attention_mask": torch.tensor([pad(f["attention_mask"], width, 0) for f in encoded]),
             "labels": torch.tensor([pad(f["labels"], length, -100) for f in encoded])}
    with torch.inference_mode():
        logits = model(**batch).logits[batch["labels"] != -100]
    if reference_logits is None:
        reference_logits = logits
    entry["relative_logit_error"] = ((logits - reference_logits).norm() / reference_logits.norm()).item()
    entry["next_token_agreement"] = (logits.argmax(-1) == reference_logits.argmax(-1)).float().mean().item()
    report[folder] = entry
print(json.dumps(report))
"""


def _weights_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _card(folder) -> dict:
    return json.loads((folder / "model_card.json").read_text())


@pytest.fixture(scope="module")
def quantized(chain, tmp_path_factory):
    """method → (folder, stdout) for the four methods, from the chain's fine-tuned model."""
    root = tmp_path_factory.mktemp("quantized")
    runs = {"int8-dynamic": [], "int8-static": ["--data-dir", str(chain["data"]), "--calibration-size", CALIBRATION_SIZE],
            "fp16": [], "bf16": []}

    def quantize(method: str):
        result = run_step("quantize.py", "--model-dir", str(chain["tuned"]), "--method", method,
                          "--output-dir", str(root / method), *runs[method], env=ONE_THREAD)
        return method, (root / method, result.stdout)

    with ThreadPoolExecutor(max_workers=2) as pool:  # two subprocesses at a time: CI has 2 cores
        return dict(pool.map(quantize, runs))


@pytest.fixture(scope="module")
def reloaded(chain, quantized):
    """What a fresh process gets from each folder (see RELOAD_SCRIPT), keyed by method and "fp32"."""
    full = [str(quantized[m][0]) for m in ("int8-dynamic", "int8-static")]
    short = [str(quantized[m][0]) for m in ("fp16", "bf16")]
    result = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, str(STEPS), str(chain["data"]), str(QUALITY_EXAMPLES),
                             str(chain["tuned"]), ",".join(full), ",".join(short)],
                            capture_output=True, text=True, timeout=600, env={**os.environ, **ONE_THREAD})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    by_method = {method: report[str(folder)] for method, (folder, _) in quantized.items()}
    return {"fp32": report[str(chain["tuned"])], **by_method}


def test_int8_dynamic_halves_a_model_whose_linear_layers_dominate(chain, tmp_path):
    """The tiny model's embeddings and lm_head (fp32 by design) are a quarter of its weights, so the
    2x claim is checked on a T5 whose Linear layers dominate (random weights: size does not care)."""
    import torch
    from stepkit.modeling import save_model
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=64, d_model=256, d_kv=64, d_ff=1024, num_layers=2, num_decoder_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head)
    assert linear / sum(p.numel() for p in model.parameters()) > 0.95
    # A model folder needs a tokenizer; the chain's is borrowed (the step never encodes text for int8-dynamic).
    fp32, int8 = tmp_path / "fp32", tmp_path / "int8"
    save_model(model, AutoTokenizer.from_pretrained(chain["tuned"]), fp32, {"base_model": "random linear-dominated T5"})

    # The step reloads what it wrote and checks the logits equal the in-memory model's (check_round_trip).
    result = run_step("quantize.py", "--model-dir", str(fp32), "--method", "int8-dynamic", "--output-dir", str(int8),
                      env=ONE_THREAD)
    before, after = _weights_bytes(fp32), _weights_bytes(int8)
    assert before / after >= 2.0, (before, after)
    card = _card(int8)
    assert card["size_on_disk_bytes"] == {"before": before, "after": after, "counts": "weight files only"}
    assert card["compression_ratio"] == pytest.approx(before / after, abs=1e-3)
    assert f"{before:,} → {after:,} bytes" in result.stdout


def test_int8_artifacts_are_int8_safetensors_with_a_complete_card(chain, quantized):
    from safetensors import safe_open

    before = _weights_bytes(chain["tuned"])
    for method in ("int8-dynamic", "int8-static"):
        folder, stdout = quantized[method]
        assert sorted(p.name for p in folder.glob("*.safetensors")) == ["quantized_model.safetensors"]
        assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))  # no pickles
        with safe_open(str(folder / "quantized_model.safetensors"), "pt") as weights:
            assert weights.metadata()["method"] == method
            q = "encoder.block.0.layer.0.SelfAttention.q"
            assert str(weights.get_tensor(f"{q}.weight").dtype) == "torch.int8"
            assert weights.get_slice(f"{q}.weight_scale").get_shape() == [weights.get_slice(f"{q}.weight").get_shape()[0]]
            assert (f"{q}.input_scale" in weights.keys()) == (method == "int8-static")
            assert str(weights.get_tensor("encoder.block.0.layer.1.DenseReluDense.wo.weight").dtype) == "torch.float32"
        after = _weights_bytes(folder)
        assert after < 0.6 * before  # the tiny model: 1.75x (embeddings and lm_head stay fp32)
        card = _card(folder)
        assert card["method"] == "quantize" and card["base_model"] == "tiny"
        assert card["parameters"] == _card(chain["tuned"])["parameters"]
        assert card["size_on_disk_bytes"]["before"] == before and card["size_on_disk_bytes"]["after"] == after
        details = card["quantization"]
        assert details["method"] == method
        kept = details["kept_in_full_precision"]
        assert {"lm_head.weight", "shared.weight", "encoder.block.*.layer.*.DenseReluDense.wo.weight"} <= set(kept)
        assert not any(".q." in name or ".wi_0." in name for name in kept)
        assert f"quantize {method}: weights {before:,} → {after:,} bytes" in stdout
    calibration = _card(quantized["int8-static"][0])["quantization"]["calibration"]
    assert calibration["examples"] == int(CALIBRATION_SIZE) and calibration["split"] == "train"
    assert calibration["source_tokens"] > int(CALIBRATION_SIZE)
    assert _card(quantized["int8-dynamic"][0])["quantization"]["calibration"] is None


@pytest.mark.parametrize("method", ["int8-dynamic", "int8-static"])
def test_int8_reloads_in_a_fresh_process_runs_int8_kernels_and_stays_close_to_fp32(reloaded, method):
    fp32, int8 = reloaded["fp32"], reloaded[method]
    expected_q = {"int8-dynamic": "torch.ao.nn.quantized.dynamic.modules.linear.Linear",
                  "int8-static": "stepkit.quantization.StaticInt8Linear"}[method]
    assert int8["q_type"] == expected_q and int8["wo_type"] == "torch.nn.modules.linear.Linear"
    assert "torch.ao.nn.quantized.modules.linear.LinearPackedParams" in int8["module_types"]  # packed int8 weights
    assert int8["rougeL"] == pytest.approx(fp32["rougeL"], abs=ROUGE_TOLERANCE), (int8["rougeL"], fp32["rougeL"])
    assert int8["relative_logit_error"] <= MAX_RELATIVE_LOGIT_ERROR
    assert int8["next_token_agreement"] >= MIN_NEXT_TOKEN_AGREEMENT
    assert fp32["relative_logit_error"] == 0.0 and fp32["rougeL"] > 0.3  # the reference is a trained model


def test_int8_artifacts_serve_under_transformers_5_and_the_4_51_toolkit(chain, quantized, tmp_path):
    """Both int8 methods as model.tar.gz, through code/inference.py and the Hugging Face image's toolkit."""
    assert_artifacts_serve({method: quantized[method][0] for method in ("int8-dynamic", "int8-static")},
                           chain["data"], tmp_path)


@pytest.mark.parametrize("method, dtype", [("fp16", "torch.float16"), ("bf16", "torch.bfloat16")])
def test_half_precision_is_half_the_size_and_reloads_in_that_dtype(chain, quantized, reloaded, method, dtype):
    folder, stdout = quantized[method]
    ratio = _weights_bytes(chain["tuned"]) / _weights_bytes(folder)
    assert 1.95 < ratio < 2.05
    assert reloaded[method]["dtype"] == dtype
    assert any(reloaded[method]["summaries"])
    card = _card(folder)
    assert card["quantization"]["dtype"] == dtype.removeprefix("torch.")
    assert card["compression_ratio"] == pytest.approx(ratio, abs=1e-3)
    assert ("overflows" in stdout) == (method == "fp16") and ("warning" in card["quantization"]) == (method == "fp16")


def _bad_inputs(chain, quantized, tmp_path):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    tuned = str(chain["tuned"])
    return {
        "missing model": (["--model-dir", str(tmp_path / "nowhere"), "--method", "int8-dynamic"], r"nowhere: no such folder"),
        "not T5": (["--model-dir", str(bert), "--method", "int8-dynamic"], r"model_type 'bert' is not supported"),
        "unknown method": (["--model-dir", tuned, "--method", "int4"],
                           r"--method 'int4': unknown method; choose one of fp16, bf16, int8-dynamic, int8-static"),
        "static without data": (["--model-dir", tuned, "--method", "int8-static"],
                                r"int8-static calibrates on training data: pass --data-dir"),
        "no calibration": (["--model-dir", tuned, "--method", "int8-static", "--data-dir", str(chain["data"]),
                            "--calibration-size", "0"], r"--calibration-size must be at least 1, got 0"),
        "already quantized": (["--model-dir", str(quantized["int8-dynamic"][0]), "--method", "int8-static",
                               "--data-dir", str(chain["data"])], r"already quantized \(int8-dynamic\); quantize the full"),
    }


BAD_INPUTS = ["missing model", "not T5", "unknown method", "static without data", "no calibration", "already quantized"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_with_one_clear_line_and_no_output(chain, quantized, tmp_path, case):
    args, message = _bad_inputs(chain, quantized, tmp_path)[case]
    output = tmp_path / "out"
    result = run_step("quantize.py", *args, "--output-dir", str(output), check=False,
                      env={"SM_CHANNEL_DATA": "", "SM_CHANNEL_TRAIN": ""})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not output.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_int8_loader_rejects_a_mismatched_config_or_format(quantized, tmp_path):
    """The loader never silently initializes what the file lacks: wrong config, format or file → clear error."""
    import shutil

    import quantize
    from safetensors.torch import load_file, save_file
    from stepkit import quantization
    from stepkit.errors import StepError
    from stepkit.modeling import load_model_and_tokenizer

    assert quantize.METHODS == quantization.METHODS  # the step keeps its own copy so that errors come before torch loads

    source = quantized["int8-dynamic"][0]
    wider = shutil.copytree(source, tmp_path / "wider")
    config = json.loads((wider / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps({**config, "d_ff": config["d_ff"] * 2}))
    with pytest.raises(StepError, match=r"int8 layer of shape .* but config.json's model has Linear"):
        load_model_and_tokenizer(wider)

    future = shutil.copytree(source, tmp_path / "future")
    path = future / "quantized_model.safetensors"
    save_file(load_file(str(path)), str(path), metadata={"format": "flanops-int8", "format_version": "2"})
    with pytest.raises(StepError, match=r"version '2'; this version of flanops reads flanops-int8 version 1"):
        load_model_and_tokenizer(future)

    truncated = shutil.copytree(source, tmp_path / "truncated")
    path = truncated / "quantized_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(StepError, match=r"not a readable safetensors file .* corrupted or truncated"):
        load_model_and_tokenizer(truncated)
