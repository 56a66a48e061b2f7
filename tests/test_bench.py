"""`flanops bench`: the harness end to end on a tiny model (structure only, no timing assertions) and bad input.

The smoke run goes through every section with one repetition, in a process of its own: the
executor section starts embedded AWS (in this test's FLANOPS_HOME, stopped afterwards) and
points AWS variables at it, which must not leak into the test process. The peers section's ONNX
Runtime overlay is pip-installed once per machine (the user's cache folder), then reused.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import AWS_VARIABLES

from flanops.pipelines.cli import main

SMOKE = """
import json, sys
from pathlib import Path
from flanops import benchmarks
from flanops.benchmarks.harness import BenchSettings, ModelSpec
from flanops.pipelines.embedded import stop_server
from stepkit.catalog import T5Dims

tiny = ModelSpec("tiny-test", T5Dims(d_model=32, d_ff=64, d_kv=8, num_heads=2, num_layers=2, num_decoder_layers=2))
settings = BenchSettings(mode="smoke", models=(tiny,), lora_model=tiny, sections=benchmarks.SECTIONS, warmup=0,
                         repeats=1, input_tokens=16, new_tokens=2, throughput_batch=2,
                         train_batch=1, train_source_tokens=8, train_target_tokens=4, finetune_steps=1,
                         finetune_validation=2, serving_inputs=1,
                         load_clients=(1, 8), load_seconds=0.2, load_repeats=1, executor_train_size=10)
try:
    benchmarks.run(settings, Path(sys.argv[1]), command="smoke test")
finally:
    stop_server()
"""


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, dict, str]:
    root = tmp_path_factory.mktemp("bench")
    out = root / "out"
    env = {k: v for k, v in os.environ.items() if k not in AWS_VARIABLES}
    env.update(FLANOPS_HOME=str(root / "home"), PYTHONUNBUFFERED="1")
    process = subprocess.run([sys.executable, "-c", SMOKE, str(out)], capture_output=True, text=True, env=env,
                             timeout=540)
    assert process.returncode == 0, f"stdout:\n{process.stdout[-3000:]}\nstderr:\n{process.stderr[-3000:]}"
    return out, json.loads((out / "results.json").read_text(encoding="utf-8")), process.stdout


def figures(section: dict) -> dict:
    assert section["status"] == "ok", section.get("error")
    return section["figures"]


def assert_quantity(figure: dict, unit: str) -> None:
    assert figure["unit"] == unit and isinstance(figure["value"], (int, float))


def assert_spread(figure: dict, unit: str) -> None:
    assert figure["unit"] == unit
    assert figure["n"] == len(figure["samples"]) >= 1
    assert figure["min"] <= figure["median"] <= figure["max"]


def assert_ratio(figure: dict) -> None:
    assert figure["unit"] == "x" and figure["value"] > 0 and figure["meaning"]


def assert_sides_measured(sides: dict) -> None:
    for side in sides.values():
        assert side["runtime"] and side["threads"] >= 1
        assert_quantity(side["weights_bytes"], "bytes")
        assert_quantity(side["peak_rss"], "bytes")
        assert side["peak_rss"]["rss_before_load_bytes"] < side["peak_rss"]["value"]
        assert_spread(side["latency_batch1"], "ms")
        assert_spread(side["throughput"], "tokens/s")


def test_results_have_every_section_with_units_and_ratios(smoke):
    _, results, stdout = smoke
    assert results["schema"] == "flanops-bench/1" and results["failed_sections"] == []
    assert list(results["sections"]) == ["quantization", "peers", "distillation", "pruning", "lora", "serving",
                                         "executor"]
    for key in ("cpu_model", "cores", "usable_cpus", "torch_threads"):
        assert results["machine"][key]
    for key in ("python", "torch", "transformers", "flanops"):
        assert results["versions"][key]
    assert results["settings"]["repeats"] == 1 and results["settings"]["models"][0]["name"] == "tiny-test"

    run = figures(results["sections"]["quantization"])["runs"][0]
    assert list(run["variants"]) == ["fp32", "bf16", "ct2-int8"]
    assert_sides_measured(run["variants"])
    assert run["variants"]["ct2-int8"]["runtime"] == "ctranslate2"
    assert run["variants"]["bf16"]["runtime"] == "transformers"
    for ratios in run["ratios"].values():
        for key in ("size_smaller", "latency_faster", "throughput_gain", "peak_rss_smaller"):
            assert_ratio(ratios[key])
    threads = run["threads"]   # a tiny model: stepkit.threads runs it on one thread
    assert threads["stepkit_threads"] == 1 and set(threads["runtimes"]) == {"fp32", "ct2-int8"}
    for runtime in threads["runtimes"].values():
        assert list(runtime["latency_batch1"]) == ["1", "2"] and runtime["fastest"] in (1, 2)
        assert_spread(runtime["latency_batch1"]["2"], "ms")
        assert_ratio(runtime["more_threads_slower"]["2"])

    peers = figures(results["sections"]["peers"])
    run = peers["runs"][0]
    assert run["errors"] == {}, run["errors"]   # both peers made and ran here (the ONNX Runtime one in its overlay)
    assert list(run["sides"]) == ["fp32", "bf16", "ct2-int8", "ctranslate2-cli-int8", "onnxruntime-int8",
                                  "onnxruntime-int8-2-threads"]
    assert_sides_measured({name: side for name, side in run["sides"].items() if name != "onnxruntime-int8-2-threads"})
    assert run["sides"]["ctranslate2-cli-int8"]["threads"] == run["sides"]["onnxruntime-int8"]["threads"] == 1
    assert run["sides"]["onnxruntime-int8-2-threads"]["threads"] == 2
    onnx = run["sides"]["onnxruntime-int8"]["details"]
    assert onnx["versions"]["transformers"].startswith("4.57.") and set(onnx["files"]) == {
        "encoder_model_quantized.onnx", "decoder_model_quantized.onnx", "decoder_with_past_model_quantized.onnx"}
    assert onnx["output_shapes"]["1"] == [1, 3]   # exactly new_tokens after the decoder start token
    for peer in ("ctranslate2-cli-int8", "onnxruntime-int8"):
        for key in ("latency", "size", "throughput", "peak_rss"):
            assert_ratio(run["against_peers"][peer][key])
        assert_ratio(run["vs_fp32"][peer]["latency_faster"])
    # flanops converts with CTranslate2's own converter: the same bytes as its CLI's
    assert run["against_peers"]["ctranslate2-cli-int8"]["size"]["value"] == 1.0

    run = figures(results["sections"]["distillation"])["runs"][0]
    # a 2+2 teacher: the default keeps one block of each; the candidates of a shape already measured are skipped
    assert {name: side["layers"] for name, side in run["sides"].items()} == {
        "teacher": {"encoder": 2, "decoder": 2}, "default": {"encoder": 1, "decoder": 1},
        "whole encoder, quarter decoder": {"encoder": 2, "decoder": 1}}
    assert run["sides"]["default"]["kept_blocks"] == {"encoder": [0], "decoder": [0]}
    for name in ("default", "whole encoder, quarter decoder"):
        assert_ratio(run["ratios"][name]["latency_faster"])
        assert_ratio(run["ratios"][name]["size_smaller"])

    run = figures(results["sections"]["pruning"])["runs"][0]
    assert list(run["variants"]) == ["dense", "structured-25%", "structured-50%"]
    assert run["variants"]["structured-50%"]["d_ff"] == 32
    assert_ratio(run["ratios"]["structured-50%"]["latency_faster"])
    assert run["unstructured"]["ratios"]["size_smaller"]["value"] == pytest.approx(1.0, abs=0.01)
    assert run["unstructured"]["ratios"]["gzip_size_smaller"]["value"] > 1
    assert "dense kernels" in run["unstructured"]["note"]

    lora = figures(results["sections"]["lora"])
    assert lora["sides"]["lora"]["trainable_parameters"]["value"] < lora["sides"]["full"]["trainable_parameters"]["value"]
    full = lora["sides"]["full"]   # AdamW: two moments per parameter (and a step count per tensor)
    assert full["optimizer_state_bytes"]["value"] == pytest.approx(2 * full["gradient_bytes"]["value"], rel=1e-3)
    assert_quantity(lora["sides"]["full"]["peak_rss"], "bytes")
    assert_spread(lora["sides"]["lora"]["step_time"], "ms")
    finetune = lora["finetune"]   # finetune_lora.py itself, with its defaults, in a process of its own
    assert_quantity(finetune["peak_rss"], "bytes")
    assert finetune["examples"]["sources_cut"] == finetune["examples"]["train"]   # every source reaches 512 tokens
    assert isinstance(finetune["gradient_checkpointing"], bool) and finetune["eval_batch_size"] >= 1

    serving = figures(results["sections"]["serving"])
    assert serving["variant"] == "ct2-int8" and serving["served"]["runtime"] == "ctranslate2"
    assert serving["latency"]["endpoint"]["p99"] >= serving["latency"]["endpoint"]["p50"] > 0
    assert list(serving["load"]["levels"]) == ["1 client", "8 clients"]
    assert_ratio(serving["load"]["scaling"]["8 clients"])
    for level in serving["load"]["levels"].values():
        for key in ("latency_p50", "latency_p95", "latency_p99", "latency_max"):
            assert_quantity(level[key], "ms")
        assert level["latency_p50"]["value"] <= level["latency_p95"]["value"] <= level["latency_p99"]["value"]
        assert level["mismatches"] == {"value": 0, "unit": "answers", "meaning": level["mismatches"]["meaning"]}

    executor = figures(results["sections"]["executor"])
    assert_spread(executor["executor"], "ms")
    assert_spread(executor["by_hand"], "ms")
    assert "--train-size" in executor["job_arguments"]

    assert "round 1/1" in stdout and "quantization tiny-test" in stdout   # progress lines


def test_targets_say_met_or_missed(smoke):
    _, results, _ = smoke
    ids = {t["id"] for t in results["targets"]}
    assert {"quantization.ct2_int8_size.tiny-test", "peers.ct2_cli_latency.tiny-test", "peers.ct2_cli_size.tiny-test",
            "distillation.student_latency.tiny-test", "lora.finetune_peak_rss.tiny-test", "serving.overhead",
            "serving.concurrency", "serving.consistency"} <= ids
    for item in results["targets"]:
        assert isinstance(item["met"], bool) and item["unit"] and isinstance(item["measured"], (int, float))


def test_markdown_has_every_section_and_its_chart(smoke):
    out, results, _ = smoke
    page = (out / "BENCHMARKS.md").read_text(encoding="utf-8")
    for section in results["sections"].values():
        assert f"## {section['title']}" in page
    for chart in ("quantization", "threads", "peers", "distillation", "pruning", "lora", "serving", "executor"):
        assert f"]({chart}.png)" in page
        assert (out / f"{chart}.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Targets" in page and not list(out.glob(".*partial*"))


@pytest.mark.parametrize("argv, message", [
    (["--models", "flan-t5-huge"], "--models 'flan-t5-huge'"),
    (["--sections", "quantization,speed"], "unknown section(s) speed"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err and err.count("\n") == 1


def test_unwritable_out_is_refused(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder", encoding="utf-8")
    assert main(["bench", "--sections", "executor", "--out", str(blocker / "results")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and "Traceback" not in err
