"""Pruning the chain's fine-tuned tiny T5 (d_model 128, d_ff 512, 4 heads of 32, 2+2 layers, gated FFN).

Two runs of steps/prune.py per session (structured, and unstructured with a short recovery
fine-tune); the remaining tests read what they wrote, or call stepkit.pruning in process.
"""
from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import run_step
from safetensors.torch import load_file
from test_inference_handler import assert_artifacts_serve

RECOVERY_STEPS = 3


@pytest.fixture(scope="module")
def structured(chain, tmp_path_factory):
    """Half of the FFN neurons and half of the heads of every layer, ranked by weights (no data)."""
    out = tmp_path_factory.mktemp("prune") / "structured"
    result = run_step("prune.py", "--model-dir", str(chain["tuned"]), "--method", "structured", "--target", "both",
                      "--amount", "0.5", "--output-dir", str(out))
    return {"dir": out, "stdout": result.stdout, "card": json.loads((out / "model_card.json").read_text())}


@pytest.fixture(scope="module")
def unstructured(chain, tmp_path_factory):
    """Half of the block weights zeroed (global magnitude), then a few LoRA recovery steps, merged."""
    out = tmp_path_factory.mktemp("prune") / "unstructured"
    result = run_step("prune.py", "--model-dir", str(chain["tuned"]), "--method", "unstructured", "--amount", "0.5",
                      "--data-dir", str(chain["data"]), "--recovery-steps", str(RECOVERY_STEPS), "--batch-size", "4",
                      "--max-train-examples", "48", "--max-validation-examples", "32", "--output-dir", str(out))
    return {"dir": out, "stdout": result.stdout, "card": json.loads((out / "model_card.json").read_text())}


def _block_matrices(weights: dict) -> dict:
    """The block Linear weights (what unstructured pruning prunes): 2-D, inside a block, not the position bias."""
    return {k: v for k, v in weights.items()
            if ".block." in k and v.dim() == 2 and "relative_attention_bias" not in k}


def test_structured_removes_exactly_the_requested_units(chain, structured):
    config = json.loads((chain["tuned"] / "config.json").read_text())
    assert config["feed_forward_proj"].startswith("gated")  # wi_0, wi_1 and wo each lose neurons
    d, f, d_kv, heads, buckets = (config[k] for k in ("d_model", "d_ff", "d_kv", "num_heads",
                                                       "relative_attention_num_buckets"))
    enc, dec = config["num_layers"], config["num_decoder_layers"]
    ffn_blocks, attention_modules, bias_tables = enc + dec, enc + 2 * dec, 2  # decoder: self- and cross-attention
    removed_ffn = ffn_blocks * 3 * d * (f // 2)  # rows of wi_0 and wi_1, columns of wo
    removed_heads = attention_modules * 4 * d * d_kv * (heads // 2) + bias_tables * buckets * (heads // 2)  # q,k,v rows, o columns
    if (d, f, d_kv, heads, enc, dec, buckets) == (128, 512, 32, 4, 2, 2, 32):  # the tiny model: the figures written out
        assert (removed_ffn, removed_heads) == (393_216, 196_736)

    card = structured["card"]
    assert card["parameters_after"] == card["parameters_before"] - removed_ffn - removed_heads
    saved = load_file(structured["dir"] / "model.safetensors")
    assert sum(t.numel() for t in saved.values()) == card["parameters_after"]
    pruned_config = json.loads((structured["dir"] / "config.json").read_text())
    assert (pruned_config["d_ff"], pruned_config["num_heads"], pruned_config["d_kv"]) == (f // 2, heads // 2, d_kv)
    assert saved["decoder.block.1.layer.2.DenseReluDense.wo.weight"].shape == (d, f // 2)
    assert saved["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape == (buckets, heads // 2)
    assert card["size"]["after"]["weights_bytes"] < card["size"]["before"]["weights_bytes"]
    assert card["pruning"]["removed_per_layer"] == {"ffn": f // 2, "heads": heads // 2}
    assert f"parameters {card['parameters_before']:,} → {card['parameters_after']:,}" in structured["stdout"]


def test_structured_result_loads_with_plain_transformers_and_generates(chain, structured):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from stepkit.prompt import format_prompt

    # This process never held the pruned model: only the files written by prune.py are read.
    model = AutoModelForSeq2SeqLM.from_pretrained(structured["dir"])
    tokenizer = AutoTokenizer.from_pretrained(structured["dir"])
    assert sum(p.numel() for p in model.parameters()) == structured["card"]["parameters_after"]
    dialogue = json.loads((chain["data"] / "test.jsonl").read_text().splitlines()[0])["dialogue"]
    inputs = tokenizer([format_prompt(dialogue)], return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    text = tokenizer.decode(output[0], skip_special_tokens=True)
    assert sum(c.isalpha() for c in text) >= 5, text


def test_structured_artifact_serves_under_transformers_5_and_the_4_51_toolkit(chain, structured, tmp_path):
    assert_artifacts_serve({"pruned": structured["dir"]}, chain["data"], tmp_path)


def test_structured_removal_equals_zeroing_those_units(chain):
    """The smaller model computes what the original computes with the chosen units' outputs set to zero."""
    from stepkit.modeling import load_model_and_tokenizer
    from stepkit.pruning import (activation_scores, attentions, check_structured_amount, choose_units, feed_forwards,
                                 prune_structured)
    from stepkit.records import read_split
    from stepkit.training import encode_records

    model, tokenizer = load_model_and_tokenizer(chain["tuned"])
    reference, _ = load_model_and_tokenizer(chain["tuned"])
    rows = random.Random(0).sample(read_split(chain["data"], "train"), 6)
    features = encode_records(tokenizer, rows, 512, 128).features
    remove = check_structured_amount(model.config, "both", 0.5)
    chosen = choose_units(model, activation_scores(model, features[:4]), remove)
    prune_structured(model, chosen)
    self_heads = {name: heads for name, heads in chosen["heads"].items() if "self_attention" in name}
    for stack in ("encoder", "decoder"):  # one choice per stack: its layers share the position bias
        assert len({tuple(h) for n, h in self_heads.items() if n.startswith(stack)}) == 1
    with torch.no_grad():
        for name, ff in feed_forwards(reference):
            ff.wo.weight[:, chosen["ffn"][name]] = 0
        for _, name, attention in attentions(reference):
            for head in chosen["heads"][name]:
                attention.o.weight[:, head * attention.key_value_proj_dim:(head + 1) * attention.key_value_proj_dim] = 0
        model.eval()
        reference.eval()
        for feature in features[4:]:
            batch = {"input_ids": torch.tensor([feature["input_ids"]]), "labels": torch.tensor([feature["labels"]])}
            torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, atol=1e-4, rtol=1e-4)


def test_unstructured_zeros_are_on_disk_and_reach_the_target(chain, unstructured):
    saved = load_file(unstructured["dir"] / "model.safetensors")
    pruned = _block_matrices(saved)
    zeros = sum(int((t == 0).sum()) for t in pruned.values())
    total = sum(t.numel() for t in pruned.values())
    assert abs(zeros / total - 0.5) <= 0.01, zeros / total
    assert (saved["shared.weight"] == 0).float().mean() < 0.01  # the embedding and LM head are not pruned
    assert (saved["lm_head.weight"] == 0).float().mean() < 0.01
    original = load_file(chain["tuned"] / "model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in original.items()}  # dense: same shapes
    card = unstructured["card"]
    assert card["sparsity"]["pruned_layers"] == pytest.approx(zeros / total, abs=1e-6)
    assert card["sparsity"]["zeros_in_pruned_layers"] == zeros
    assert card["parameters_after"] == card["parameters_before"] and card["nonzero_parameters"] < card["parameters_after"]
    # Honest about size: the dense file is as big as before; only compression gains.
    size = card["size"]
    assert abs(size["after"]["weights_bytes"] - size["before"]["weights_bytes"]) < 1024
    assert size["after"]["weights_gzip_bytes"] < 0.9 * size["before"]["weights_gzip_bytes"]
    assert "no speed-up" in card["note"] or "same work" in card["note"]
    assert "sparsity 50.00% of pruned layers" in unstructured["stdout"]


def test_recovery_fine_tune_runs_is_merged_and_keeps_the_zeros(chain, unstructured):
    assert "[recovery] epoch" in unstructured["stdout"] and f"step {RECOVERY_STEPS}/{RECOVERY_STEPS}" in unstructured["stdout"]
    card = unstructured["card"]
    recovery = card["recovery"]
    assert recovery["steps"] == RECOVERY_STEPS and recovery["merged"] and recovery["train_examples"] == 48
    assert recovery["lora"]["target_modules"] == "all-linear"
    assert set(card["validation_loss"]) == {"examples", "before_pruning", "after_pruning", "after_recovery"}
    assert card["validation_loss"]["examples"] == 32
    saved = _block_matrices(load_file(unstructured["dir"] / "model.safetensors"))
    original = _block_matrices(load_file(chain["tuned"] / "model.safetensors"))
    kept_changed = sum(int(((saved[k] - original[k]).abs() > 1e-6).logical_and(saved[k] != 0).sum()) for k in saved)
    assert kept_changed > 0.1 * sum(int((t != 0).sum()) for t in saved.values())  # the LoRA update reached the weights
    assert (saved["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"] == 0).any()  # while pruned ones stayed zero


@pytest.mark.parametrize("extra, message", [
    (["--method", "structured", "--amount", "1"], "--amount must be below 1"),
    (["--method", "structured", "--amount", "1.5"], "--amount must be below 1"),
    (["--method", "unstructured", "--amount", "0"], "--amount must be above 0"),
    (["--method", "magnitude", "--amount", "0.5"], "--method 'magnitude' is not known"),
    (["--method", "structured", "--target", "heads", "--amount", "0.9"], "would remove every one of the 4 attention heads"),
    (["--method", "structured", "--target", "heads", "--amount", "0.1"], "removes no attention heads"),
    (["--method", "unstructured", "--amount", "0.5", "--recovery-steps", "10"], "--recovery-steps 10 fine-tunes on the training split: pass --data-dir"),
    (["--method", "unstructured", "--amount", "0.5", "--target", "ffn"], "--target applies to --method structured only"),
])
def test_prune_rejects_bad_settings(chain, tmp_path, reliability, extra, message):
    result = run_step("prune.py", "--model-dir", str(chain["tuned"]), "--output-dir", str(tmp_path / "out"), *extra,
                      check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
    if "--amount must be below 1" in message:
        error = next(line for line in result.stderr.splitlines() if line.startswith("error: "))
        reliability.record("config.sparsity", f"prune.py {' '.join(extra)}: exit {result.returncode}: {error}")


def test_prune_rejects_missing_and_foreign_model_folders(tmp_path):
    common = ["--method", "structured", "--amount", "0.5", "--output-dir", str(tmp_path / "out")]
    missing = run_step("prune.py", "--model-dir", str(tmp_path / "nope"), *common, check=False)
    assert missing.returncode == 2 and "no such folder" in missing.stderr
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    foreign = run_step("prune.py", "--model-dir", str(bert), *common, check=False)
    assert foreign.returncode == 2 and "model_type 'bert' is not supported" in foreign.stderr
    unset = run_step("prune.py", "--model-dir", str(bert), "--method", "structured", "--amount", "0.5", check=False,
                     env={"SM_MODEL_DIR": ""})
    assert unset.returncode == 2 and "--output-dir is required or set SM_MODEL_DIR" in unset.stderr
    assert "Traceback" not in missing.stderr + foreign.stderr + unset.stderr and not (tmp_path / "out").exists()
