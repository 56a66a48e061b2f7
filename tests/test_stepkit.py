"""Unit tests of the shared step library: metrics, warm-up noising, atomic outputs, tokenization."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap

import pytest
from conftest import STEPS
from stepkit.contract import COMPLETE_MARKER, atomic_output_dir, is_complete
from stepkit.errors import StepError
from stepkit.metrics import best_constant_output, fact_accuracy, rouge
from stepkit.prompt import PROMPT_TEMPLATE, format_prompt
from stepkit.pretraining import corpus_pairs
from stepkit.scenarios import CITIES, FIRST_NAMES, SURNAMES
from stepkit.synthetic import NAME_STYLES, generate_splits, invented_name, unseen_in_train
from stepkit.tiny import span_corrupt, train_tokenizer
from stepkit.catalog import CATALOG, GIB, T5Dims
from stepkit.training import (MAX_EVAL_BATCH_SIZE, Encoded, TrainSettings, activation_bytes, encode_pairs,
                              evaluation_batch_size, plan_memory)

pytestmark = pytest.mark.smoke   # the quick tier: pytest -m smoke


# ---------------------------------------------------------------- metrics


def test_prediction_equal_to_any_reference_scores_one():
    references = [["Tom books a table for two on Friday.", "Anna pays $45 on Monday. She is happy."]]
    for reference in references[0]:
        scores = rouge([reference], references)
        assert scores == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "rougeLsum": 1.0})


def test_rouge_takes_the_best_reference_not_the_first():
    prediction = "Anna pays the rent on Monday."
    alone = rouge([prediction], [["Something unrelated entirely."]])["rougeL"]
    with_match = rouge([prediction], [["Something unrelated entirely.", "Anna pays the rent on Monday."]])["rougeL"]
    assert alone < 0.3 and with_match == pytest.approx(1.0)


def test_best_constant_output_picks_the_candidate_that_fits_most_references():
    references = [["Tom books a table on Friday."], ["Tom books a table on Monday."], ["Anna sells a lamp."]]
    candidates = ["Anna sells a lamp.", "Tom books a table on Sunday.", "Unrelated words here."]
    best = best_constant_output(candidates, references)
    assert best["text"] == "Tom books a table on Sunday."
    assert best["candidates_tried"] == 3
    assert 0 < best["scores"]["rougeL"] < 1


def test_fact_accuracy_matches_whole_values_only():
    facts = [{"speakers": ["Anna", "Tom"], "amount": "$45", "day": "Friday"}]
    right = fact_accuracy(["Anna pays Tom $45 on Friday."], facts)
    assert right["all_facts_right"] == 1.0
    wrong = fact_accuracy(["Annabel pays Tom $450 on Friday."], facts)
    assert wrong["per_slot"] == {"amount": 0.0, "day": 1.0, "speakers": 0.0}
    assert wrong["all_facts_right"] == 0.0
    assert fact_accuracy(["anything"], [None]) is None


# ---------------------------------------------------------------- prompt and data


def test_prompt_template_is_flan_style_and_used_once():
    prompt = format_prompt("  #Person1#: Hi.\n#Person2#: Hello.  ")
    assert prompt.startswith("Summarize the following conversation.") and prompt.endswith("Summary:")
    assert "#Person1#: Hi.\n#Person2#: Hello." in prompt
    uses = [p.name for p in STEPS.rglob("*.py") if "Summarize the following" in p.read_text()]
    assert uses == ["prompt.py"], f"the prompt template must be defined once, found in {uses}"
    assert PROMPT_TEMPLATE.count("{dialogue}") == 1


def test_synthetic_held_out_splits_contain_unseen_intent_day_pairs():
    splits = generate_splits({"train": 400, "validation": 50, "test": 80}, seed=3)
    seen = {(r["intent"], r["facts"].get("day")) for r in splits["train"]}
    unseen = [r for r in splits["test"] if (r["intent"], r["facts"].get("day")) not in seen]
    assert len(unseen) >= 10
    shares = unseen_in_train(splits["train"], splits["test"])
    assert shares["intent_day_pair"] == pytest.approx(len(unseen) / 80, abs=1e-4)
    assert shares["speaker_name"] == 1.0
    assert generate_splits({"train": 5, "validation": 1, "test": 1}, seed=3) == \
        generate_splits({"train": 5, "validation": 1, "test": 1}, seed=3)


# ---------------------------------------------------------------- tiny model pieces


def test_span_corruption_target_restores_the_masked_spans():
    ids = list(range(10, 60))
    sentinels = [1000 + i for i in range(32)]
    source, target = span_corrupt(ids, sentinels, eos_id=1, rng=random.Random(0))
    assert source[-1] == 1 and target[-1] == 1
    restored, spans = [], {}
    current = None
    for token in target[:-1]:
        if token in sentinels:
            current = token
            spans[current] = []
        else:
            spans[current].append(token)
    for token in source[:-1]:
        restored.extend(spans[token] if token in sentinels else [token])
    assert restored == ids
    masked = sum(len(span) for span in spans.values())
    assert 0 < masked < len(ids) / 2


@pytest.fixture(scope="module")
def small_tokenizer():
    texts = [row["dialogue"] + " " + row["summary"] for row in generate_splits({"train": 200}, seed=1)["train"]]
    return train_tokenizer(texts, vocab_size=400)


def test_tiny_tokenizer_keeps_t5_special_ids_and_round_trips_amounts(small_tokenizer):
    assert (small_tokenizer.pad_token_id, small_tokenizer.eos_token_id, small_tokenizer.unk_token_id) == (0, 1, 2)
    text = "Anna pays $1248.50 on Friday at 3:45 pm."
    ids = small_tokenizer(text)["input_ids"]
    assert ids[-1] == 1
    assert small_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tiny_tokenizer_spells_any_name_and_splits_digits(small_tokenizer):
    """A held-out name must be copyable piece by piece (no <unk>), and an amount digit by digit."""
    for text in ("Ximena Okafor paid $2119", "Zyqwux"):
        pieces = small_tokenizer.tokenize(text)
        assert "<unk>" not in pieces and small_tokenizer.convert_tokens_to_string(pieces) == text
    assert [p for p in small_tokenizer.tokenize("$2119") if p.strip("▁")][-4:] == ["2", "1", "1", "9"]


def test_synthetic_held_out_splits_use_only_values_train_never_has():
    splits = generate_splits({"train": 600, "validation": 60, "test": 120}, seed=5)
    train_facts = [row["facts"] for row in splits["train"]]
    for slot in ("amount", "place", "city"):
        seen = {facts[slot] for facts in train_facts if slot in facts}
        held = [row["facts"][slot] for row in splits["test"] if slot in row["facts"]]
        assert held and not seen & set(held), slot
    seen_names = {name for facts in train_facts for name in facts["speakers"]}
    assert not seen_names & {name for row in splits["test"] for name in row["facts"]["speakers"]}
    assert len(seen_names) > 500 and not seen_names & set(FIRST_NAMES)   # invented: too many to memorise
    shares = unseen_in_train(splits["train"], splits["test"])
    assert shares["speaker_name"] == shares["amount"] == 1.0 and 0.3 < shares["time"] < 1


def test_synthetic_summaries_state_every_recorded_fact_and_the_dialogue_gives_it():
    for split in generate_splits({"train": 300, "test": 100}, seed=2).values():
        for row in split:
            for value in (v for values in row["facts"].values() for v in (values if isinstance(values, list) else [values])):
                assert all(value in reference for reference in row["references"]) and value in row["dialogue"], row["id"]


def test_pretraining_corpus_invents_its_names_and_answers_from_the_text():
    pairs = corpus_pairs(400, seed=0)
    assert {pair.task for pair in pairs} == {"infill", "corrupt", "question"}
    evaluation_names = set(FIRST_NAMES) | set(SURNAMES) | set(CITIES)
    text = " ".join(pair.source for pair in pairs)
    assert not {word.strip(".,?!'s") for word in text.split()} & evaluation_names
    for pair in pairs:
        if pair.task == "question":
            assert pair.target and pair.target.split(" and ")[0] in pair.source.split("Question:")[0]
        assert "Summary:" not in pair.source     # never the downstream task


def test_encode_pairs_counts_truncations_instead_of_hiding_them(small_tokenizer):
    encoded = encode_pairs(small_tokenizer, ["short", "a much longer source text " * 20], ["ok", "fine"],
                           max_source_length=16, max_target_length=8)
    assert encoded.truncated_sources == 1 and encoded.truncated_targets == 0
    assert all(len(f["input_ids"]) <= 16 and f["input_ids"][-1] == 1 for f in encoded.features)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_steps": 0, "learning_rate": 1e-3}, "--max-steps"),
    ({"max_steps": 5, "learning_rate": 0}, "--learning-rate"),
    ({"max_steps": 5, "learning_rate": 1e-3, "precision": "fp16"}, "never fp16"),
    ({"max_steps": 5, "learning_rate": 1e-3, "early_stopping_patience": 2}, "--eval-steps"),
    ({"max_steps": 5, "learning_rate": 1e-3, "eval_batch_size": 0}, "--eval-batch-size"),
])
def test_train_settings_reject_bad_values(kwargs, message):
    with pytest.raises(StepError, match=message):
        TrainSettings(**kwargs)


# ---------------------------------------------------------------- memory

BASE = CATALOG["flan-t5-base"].dims
STAND_IN = T5Dims.from_config(json.loads((STEPS / "stepkit" / "standin" / "config.json").read_text()))


def examples(count: int, source_tokens: int, target_tokens: int) -> Encoded:
    return Encoded(features=[{"input_ids": [5] * source_tokens, "attention_mask": [1] * source_tokens,
                              "labels": [6] * target_tokens}] * count)


def test_activation_estimates_order_the_ways_of_running():
    train, checkpointed, evaluation = (activation_bytes(BASE, 512, 128, mode) for mode in ("train", "checkpointed", "eval"))
    assert evaluation < checkpointed < train / 4   # checkpointing keeps block inputs, not every layer's tensors
    assert activation_bytes(BASE, 256, 128, "train") < train / 2   # attention grows with the square of the length
    assert activation_bytes(BASE, 512, 128, "train", element_bytes=2) == train // 2
    with pytest.raises(ValueError, match="mode"):
        activation_bytes(BASE, 512, 128, "backward")


def test_evaluation_batch_is_sized_from_memory_and_sequence_length():
    long = examples(100, 512, 128)
    per_example = activation_bytes(BASE, 512, 128, "eval")
    assert evaluation_batch_size(BASE, long, 2 * GIB) == 2 * GIB // per_example
    assert evaluation_batch_size(BASE, long, GIB) < evaluation_batch_size(BASE, long, 2 * GIB)
    assert evaluation_batch_size(BASE, examples(100, 128, 32), 2 * GIB) > evaluation_batch_size(BASE, long, 2 * GIB)
    assert evaluation_batch_size(BASE, long, 1) == 1   # never zero, however little memory is left
    assert evaluation_batch_size(STAND_IN, long, 2 * GIB) == MAX_EVAL_BATCH_SIZE


def test_memory_plan_checkpoints_flan_t5_base_but_not_the_stand_in():
    train, validation = examples(64, 512, 128), examples(100, 512, 128)
    base = plan_memory(BASE, train, validation, batch_size=16, available_bytes=16 * GIB)
    assert base.gradient_checkpointing and base.activations_bytes == base.checkpointed_bytes < base.train_bytes
    assert base.eval_batch_size < MAX_EVAL_BATCH_SIZE and base.budget_bytes == 4 * GIB
    tiny = plan_memory(STAND_IN, train, validation, batch_size=16, available_bytes=16 * GIB)
    assert not tiny.gradient_checkpointing and tiny.eval_batch_size == MAX_EVAL_BATCH_SIZE
    short = plan_memory(BASE, examples(64, 64, 16), validation, batch_size=2, available_bytes=16 * GIB)
    assert not short.gradient_checkpointing   # a small batch of short examples fits without it


def test_memory_plan_keeps_what_the_flags_say():
    train, validation = examples(64, 512, 128), examples(100, 512, 128)
    plan = plan_memory(BASE, train, validation, batch_size=16, available_bytes=16 * GIB, gradient_checkpointing=False,
                       eval_batch_size=8)
    assert not plan.gradient_checkpointing and plan.eval_batch_size == 8
    forced = plan_memory(STAND_IN, train, None, batch_size=16, available_bytes=16 * GIB, gradient_checkpointing=True)
    assert forced.gradient_checkpointing and forced.eval_batch_size == MAX_EVAL_BATCH_SIZE
    assert "gradient checkpointing on" in forced.describe()


# ---------------------------------------------------------------- atomic outputs


def test_failed_block_publishes_nothing_and_cleans_up(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(target) as staging:
            (staging / "half.json").write_text("{")
            raise RuntimeError("step crashed")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_finished_block_is_published_with_marker_into_an_empty_folder(tmp_path):
    target = tmp_path / "out"
    target.mkdir()  # SageMaker pre-creates output folders
    with atomic_output_dir(target) as staging:
        (staging / "result.json").write_text("{}")
    assert is_complete(target) and (target / "result.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_non_empty_output_is_kept_unless_overwrite(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "mine.txt").write_text("user's work")
    with pytest.raises(StepError, match="not empty"):
        with atomic_output_dir(target):
            pass
    assert (target / "mine.txt").read_text() == "user's work"
    with atomic_output_dir(target, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == [COMPLETE_MARKER, "new.txt"]


def test_killed_step_leaves_no_folder_that_looks_complete(tmp_path):
    target = tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(STEPS)!r})
        from stepkit.contract import atomic_output_dir
        with atomic_output_dir({str(target)!r}) as staging:
            (staging / "train.jsonl").write_text("partial")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert result.returncode == -9
    assert not target.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert all(name.startswith(".out.partial-") for name in leftovers)


def test_percentile_interpolates_like_numpy():
    from stepkit.cost import percentile as _percentile

    values = [10.0, 20.0, 30.0, 40.0]
    assert _percentile(values, 50) == 25.0
    assert _percentile(values, 95) == pytest.approx(38.5)
    assert _percentile([7.0], 95) == 7.0




def test_invented_names_are_never_evaluation_names_in_either_style():
    rng = random.Random(0)
    evaluation = {name.lower() for name in FIRST_NAMES + SURNAMES + CITIES}
    for style in NAME_STYLES:
        names = {invented_name(rng, style) for _ in range(3000)}
        assert len(names) > 1000 and all(name.isalpha() and name[0].isupper() for name in names), style
        assert not {name.lower() for name in names} & evaluation, style
    with pytest.raises(ValueError, match="unknown name style 'runes'"):
        invented_name(rng, "runes")


# ---------------------------------------------------------------- s3 (select_model.py's and prepare_data.py's downloads)


def test_s3_prefix_names_one_object_or_a_folder_and_downloads_stay_inside(tmp_path, fake_aws_credentials):
    import boto3
    from moto import mock_aws
    from stepkit.s3 import download_keys, prefix_keys, split_s3_uri

    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="raw")
        for key in ("data/a.jsonl", "data/sub/b.jsonl", "data/", "data2/c.jsonl", "one.jsonl"):
            s3.put_object(Bucket="raw", Key=key, Body=key.encode())
        folder = ("data", ["data/a.jsonl", "data/sub/b.jsonl"])   # not data2/, not the folder marker data/
        assert prefix_keys(s3, "raw", "data") == folder and prefix_keys(s3, "raw", "data/") == folder
        assert prefix_keys(s3, "raw", "one.jsonl") == ("", ["one.jsonl"])
        download_keys(s3, "raw", *reversed(folder), tmp_path / "got", "--input s3://raw/data")
        assert (tmp_path / "got" / "sub" / "b.jsonl").read_text() == "data/sub/b.jsonl"
        s3.put_object(Bucket="raw", Key="/etc/evil", Body=b"x")
        with pytest.raises(StepError, match="object key '/etc/evil' would be written outside.*leaves the prefix"):
            download_keys(s3, "raw", ["one.jsonl", "/etc/evil"], "", tmp_path / "none", "--input s3://raw")
        assert not (tmp_path / "none").exists()   # checked before anything was downloaded
    with pytest.raises(StepError, match=r"^--model s3://: no bucket; write s3://bucket/prefix/$"):
        split_s3_uri("s3://", "--model")
