"""LoRA's trainable-parameter count on a Flan-T5-shaped model equals the count from its dimensions."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from stepkit import catalog

pytestmark = pytest.mark.smoke   # the quick tier: pytest -m smoke

BASE = catalog.CATALOG["flan-t5-base"]


def _peft_counts(model, r: int, targets: list[str]) -> tuple[int, int]:
    config = LoraConfig(r=r, lora_alpha=32, target_modules=targets, task_type="SEQ_2_SEQ_LM")
    return get_peft_model(model, config).get_nb_trainable_parameters()


def test_lora_q_v_r32_on_flan_t5_base_matches_the_dimensions():
    # The meta device allocates no memory: peft wraps the same modules it would on CPU.
    model = catalog.build_random_model(BASE, device="meta")
    trainable, total = _peft_counts(model, r=32, targets=["q", "v"])

    dims = BASE.dims
    inner = dims.num_heads * dims.d_kv  # 768 for base
    # q and v, each A (r x d_model) + B (inner x r); encoder self-attention, decoder self + cross
    expected = 2 * 32 * (dims.d_model + inner) * (dims.num_layers + 2 * dims.num_decoder_layers)
    assert expected == 3_538_944  # 2 * 32 * 1536 * 36, written out so a wrong formula shows
    assert trainable == expected
    assert trainable == catalog.lora_parameter_count(dims, r=32, target_modules=("q", "v"))
    # The frozen base is the full untied Flan-T5-base: 248M.
    assert total - trainable == BASE.parameters == 247_577_856


def test_lora_on_every_linear_of_flan_t5_small_matches_the_catalog_formula():
    # small has inner_dim 384 != d_model 512, so q/k/v/o shapes are not square: a sharper check.
    model = catalog.build_random_model(catalog.CATALOG["flan-t5-small"], device="meta")
    targets = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]
    trainable, _ = _peft_counts(model, r=8, targets=targets)
    assert trainable == catalog.lora_parameter_count(catalog.CATALOG["flan-t5-small"].dims, r=8, target_modules=targets)


def test_lora_layers_really_exist_on_cpu_for_a_small_shape():
    # Same count on real tensors for a cut-down T5 (meta could hide a module peft skips on CPU).
    dims = catalog.T5Dims(d_model=64, d_ff=96, d_kv=16, num_heads=3, num_layers=2, num_decoder_layers=3, vocab_size=128)
    model = catalog.build_random_model(dims)
    assert next(model.parameters()).device.type == "cpu"
    trainable, total = _peft_counts(model, r=4, targets=["q", "v"])
    assert trainable == 2 * 4 * (64 + 48) * (2 + 2 * 3)
    assert total - trainable == dims.parameters


def test_unknown_lora_target_is_a_clear_error():
    with pytest.raises(catalog.StepError, match="not a T5 Linear"):
        catalog.lora_parameter_count(BASE.dims, r=8, target_modules=("query",))


def test_meta_model_holds_no_memory():
    model = catalog.build_random_model(BASE, device="meta")
    assert all(p.device == torch.device("meta") for p in model.parameters())
