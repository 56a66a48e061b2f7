"""quantize.py: ct2-int8 (CTranslate2) and bf16/fp16 artifacts that are smaller on disk, load back
in a fresh process through stepkit.modeling, and answer like the fp32 model.

The artifacts are made once per module from the chain's LoRA fine-tuned tiny model; one fresh
process then loads each of them, as evaluate.py and inference do, and reports what it got.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import STEPS, run_step
from test_inference_handler import assert_artifacts_serve

QUALITY_EXAMPLES = 100
# One thread per process: the tiny model gains nothing from more (stepkit.threads), and two
# quantize runs share the machine's cores.
ONE_THREAD = {"SM_NUM_CPUS": "1"}
# The quick config's MaxRougeLDrop: the variant must answer within what the gate allows it to lose.
MAX_ROUGE_L_DROP = 0.05
MIN_SAME_SUMMARIES = 0.6   # measured on the tiny model: 77-85% of summaries word for word the fp32 model's

# Runs in a fresh interpreter: load each folder through load_model_and_tokenizer and summarize the
# test split; prints one JSON object with what each folder gave.
RELOAD_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from stepkit.generation import summarize
from stepkit.metrics import rouge
from stepkit.modeling import load_model_and_tokenizer
from stepkit.records import read_split
from stepkit.threads import configure_runtime

configure_runtime()
data_dir, examples, folders = sys.argv[2], int(sys.argv[3]), sys.argv[4:]
rows = read_split(data_dir, "test")[:examples]
report = {}
for folder in folders:
    model, tokenizer = load_model_and_tokenizer(folder)
    summaries = summarize(model, tokenizer, [r["dialogue"] for r in rows])
    report[folder] = {"runtime": getattr(model, "runtime", "transformers"), "dtype": str(getattr(model, "dtype", "")),
                      "summaries": summaries, "rougeL": rouge(summaries, [r["references"] for r in rows])["rougeL"]}
print(json.dumps(report))
"""


def _weights_bytes(folder) -> int:
    return sum(p.stat().st_size for p in [*folder.glob("*.safetensors"), *folder.glob("ctranslate2/model.bin")])


def _card(folder) -> dict:
    return json.loads((folder / "model_card.json").read_text())


@pytest.fixture(scope="module")
def quantized(chain, tmp_path_factory):
    """method → (folder, stdout) for every method, from the chain's fine-tuned model."""
    root = tmp_path_factory.mktemp("quantized")

    def quantize(method: str):
        result = run_step("quantize.py", "--model-dir", str(chain["tuned"]), "--method", method,
                          "--output-dir", str(root / method), env=ONE_THREAD)
        return method, (root / method, result.stdout)

    with ThreadPoolExecutor(max_workers=2) as pool:  # two subprocesses at a time: CI has 2 cores
        return dict(pool.map(quantize, ("ct2-int8", "bf16", "fp16")))


@pytest.fixture(scope="module")
def reloaded(chain, quantized):
    """What a fresh process gets from each folder (see RELOAD_SCRIPT), keyed by method and "fp32"."""
    folders = [str(chain["tuned"]), *(str(quantized[m][0]) for m in ("ct2-int8", "bf16"))]
    result = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, str(STEPS), str(chain["data"]), str(QUALITY_EXAMPLES),
                             *folders], capture_output=True, text=True, timeout=600, env={**os.environ, **ONE_THREAD})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return {"fp32": report[folders[0]], "ct2-int8": report[folders[1]], "bf16": report[folders[2]]}


def test_ct2_int8_is_a_ctranslate2_model_4x_smaller_with_a_complete_card(chain, quantized):
    folder, stdout = quantized["ct2-int8"]
    assert sorted(p.name for p in (folder / "ctranslate2").iterdir()) == ["config.json", "model.bin",
                                                                         "shared_vocabulary.json"]
    assert not list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin"))  # no torch weights beside it
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    before, after = _weights_bytes(chain["tuned"]), _weights_bytes(folder)
    # embeddings and LM head are int8 too: the whole model shrinks, not only its Linear layers
    assert before / after >= 3.5, (before, after)
    card = _card(folder)
    assert card["method"] == "quantize" and card["base_model"] == "tiny"
    assert card["parameters"] == _card(chain["tuned"])["parameters"]
    assert card["size_on_disk_bytes"] == {"before": before, "after": after, "counts": "weight files only"}
    details = card["quantization"]
    assert details["method"] == "ct2-int8" and details["runtime"] == "ctranslate2"
    import ctranslate2
    assert details["runtime_version"] == ctranslate2.__version__
    assert "embeddings" in details["weights"] and "LM head" in details["weights"]
    assert f"quantize ct2-int8: weights {before:,} → {after:,} bytes" in stdout


def test_ct2_int8_reloads_in_a_fresh_process_and_answers_like_fp32(reloaded):
    fp32, int8 = reloaded["fp32"], reloaded["ct2-int8"]
    assert int8["runtime"] == "ctranslate2" and fp32["runtime"] == "transformers"
    assert fp32["rougeL"] > 0.3  # the reference is a trained model
    assert fp32["rougeL"] - int8["rougeL"] <= MAX_ROUGE_L_DROP, (int8["rougeL"], fp32["rougeL"])
    same = sum(a == b for a, b in zip(fp32["summaries"], int8["summaries"])) / len(fp32["summaries"])
    assert same >= MIN_SAME_SUMMARIES, same


def test_ct2_int8_artifact_serves_under_transformers_5_and_the_4_51_toolkit(chain, quantized, tmp_path):
    """ct2-int8 as model.tar.gz, through code/inference.py and the Hugging Face image's toolkit (which installs
    the CTranslate2 wheel the artifact ships, without a package index). bf16 is not held to it: its rounding
    differs between the two transformers versions, and greedy decoding can then pick another token."""
    assert_artifacts_serve({"ct2-int8": quantized["ct2-int8"][0]}, chain["data"], tmp_path)


@pytest.mark.parametrize("method, dtype", [("fp16", "torch.float16"), ("bf16", "torch.bfloat16")])
def test_half_precision_is_half_the_size_and_reloads_in_that_dtype(chain, quantized, reloaded, method, dtype):
    folder, stdout = quantized[method]
    ratio = _weights_bytes(chain["tuned"]) / _weights_bytes(folder)
    assert 1.95 < ratio < 2.05
    if method in reloaded:
        assert reloaded[method]["dtype"] == dtype and any(reloaded[method]["summaries"])
    card = _card(folder)
    assert card["quantization"]["dtype"] == dtype.removeprefix("torch.")
    assert card["compression_ratio"] == pytest.approx(ratio, abs=1e-3)
    assert ("overflows" in stdout) == (method == "fp16") and ("warning" in card["quantization"]) == (method == "fp16")


def test_a_bf16_model_converts_to_ct2_int8(quantized, tmp_path):
    """A bfloat16 source (e.g. select_model.py --dtype bfloat16) converts like a float32 one."""
    out = tmp_path / "from-bf16"
    # quantize refuses a folder its card calls quantized: this one stands for a bf16 model from another step
    source = shutil.copytree(quantized["bf16"][0], tmp_path / "bf16-model")
    card = _card(source)
    del card["quantization"]
    (source / "model_card.json").write_text(json.dumps(card))
    run_step("quantize.py", "--model-dir", str(source), "--method", "ct2-int8", "--output-dir", str(out), env=ONE_THREAD)
    assert (out / "ctranslate2" / "model.bin").is_file()
    assert _weights_bytes(source) / _weights_bytes(out) >= 1.75   # bf16 → int8: about 2x


def _bad_inputs(chain, quantized, tmp_path):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    tuned = str(chain["tuned"])
    broken = shutil.copytree(chain["tuned"], tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    return {
        "missing model": (["--model-dir", str(tmp_path / "nowhere"), "--method", "ct2-int8"], r"nowhere: no such folder"),
        "not T5": (["--model-dir", str(bert), "--method", "ct2-int8"], r"model_type 'bert' is not supported"),
        "unknown method": (["--model-dir", tuned, "--method", "int4"],
                           r"--method 'int4': unknown method; choose one of ct2-int8, bf16, fp16"),
        "retired method": (["--model-dir", tuned, "--method", "int8-dynamic"],
                           r"--method 'int8-dynamic' was retired: .*torch\.ao.*; use --method ct2-int8"),
        "already quantized": (["--model-dir", str(quantized["ct2-int8"][0]), "--method", "ct2-int8"],
                              r"already quantized \(ct2-int8\); quantize the full"),
        "corrupted weights": (["--model-dir", str(broken), "--method", "ct2-int8"],
                              r"broken: model.safetensors is not a readable safetensors file .* corrupted or truncated"),
    }


BAD_INPUTS = ["missing model", "not T5", "unknown method", "retired method", "already quantized", "corrupted weights"]


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


def test_a_conversion_the_runtime_refuses_is_one_line_and_publishes_nothing(chain, tmp_path, monkeypatch):
    """Whatever CTranslate2's converter raises (an architecture or dtype it does not take) becomes one
    StepError naming the folder, and the output folder is not published."""
    import ctranslate2
    from flanops.steps import quantize
    from stepkit.errors import StepError

    def refuse(self, output_dir, **kwargs):
        raise NotImplementedError("Unsupported dtype torch.float64")

    monkeypatch.setattr(ctranslate2.converters.TransformersConverter, "convert", refuse)
    out = tmp_path / "out"
    with pytest.raises(StepError, match=r"--model-dir .*finetuned: CTranslate2 cannot convert this model "
                                        r"\(Unsupported dtype torch.float64\)"):
        quantize.main(["--model-dir", str(chain["tuned"]), "--method", "ct2-int8", "--output-dir", str(out)])
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_a_damaged_ctranslate2_folder_is_refused_naming_it(quantized, tmp_path):
    from stepkit.errors import StepError
    from stepkit.modeling import load_model_and_tokenizer

    missing = shutil.copytree(quantized["ct2-int8"][0], tmp_path / "missing")
    (missing / "ctranslate2" / "shared_vocabulary.json").unlink()
    with pytest.raises(StepError, match=r"missing: ctranslate2/ lacks shared_vocabulary.json; .*copy all of it again"):
        load_model_and_tokenizer(missing)

    truncated = shutil.copytree(quantized["ct2-int8"][0], tmp_path / "truncated")
    model_bin = truncated / "ctranslate2" / "model.bin"
    model_bin.write_bytes(model_bin.read_bytes()[: model_bin.stat().st_size // 2])
    with pytest.raises(StepError, match=r"truncated: cannot load the CTranslate2 model .* corrupted or truncated"):
        load_model_and_tokenizer(truncated)
