"""`flanops bench`: the harness end to end on a tiny model (structure only, no timing assertions) and bad input.

The smoke run goes through every section with one repetition, in a process of its own: the
executor section starts embedded AWS (in this test's FLANOPS_HOME, stopped afterwards) and
points AWS variables at it, which must not leak into the test process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import AWS_VARIABLES

from flanops.cli import main

SMOKE = """
import json, sys
from pathlib import Path
from flanops import benchmarks
from flanops.benchmarks.harness import BenchSettings, ModelSpec
from flanops.embedded import stop_server
from flanops.steps.stepkit.catalog import T5Dims

tiny = ModelSpec("tiny-test", T5Dims(d_model=32, d_ff=64, d_kv=8, num_heads=2, num_layers=2, num_decoder_layers=2))
settings = BenchSettings(mode="smoke", models=(tiny,), lora_model=tiny, sections=benchmarks.SECTIONS, warmup=0,
                         repeats=1, input_tokens=16, new_tokens=2, throughput_batch=2, calibration_examples=2,
                         train_batch=1, train_source_tokens=8, train_target_tokens=4, serving_inputs=1,
                         load_clients=(1, 4), load_seconds=0.2, load_repeats=1, executor_train_size=10)
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
                             timeout=300)
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


def test_results_have_every_section_with_units_and_ratios(smoke):
    _, results, stdout = smoke
    assert results["schema"] == "flanops-bench/1" and results["failed_sections"] == []
    assert list(results["sections"]) == ["quantization", "distillation", "pruning", "lora", "serving", "executor"]
    for key in ("cpu_model", "cores", "usable_cpus", "torch_threads"):
        assert results["machine"][key]
    for key in ("python", "torch", "transformers", "flanops"):
        assert results["versions"][key]
    assert results["settings"]["repeats"] == 1 and results["settings"]["models"][0]["name"] == "tiny-test"

    run = figures(results["sections"]["quantization"])["runs"][0]
    assert list(run["variants"]) == ["fp32", "bf16", "int8-dynamic", "int8-static"]
    for variant in run["variants"].values():
        assert_quantity(variant["weights_bytes"], "bytes")
        assert_quantity(variant["peak_rss"], "bytes")
        assert_spread(variant["latency_batch1"], "ms")
        assert_spread(variant["throughput"], "tokens/s")
    for ratios in run["ratios"].values():
        for key in ("size_smaller", "latency_faster", "throughput_gain", "peak_rss_smaller"):
            assert_ratio(ratios[key])

    run = figures(results["sections"]["distillation"])["runs"][0]
    assert run["sides"]["student"]["layers"] == {"encoder": 1, "decoder": 1}
    assert_ratio(run["ratios"]["latency_faster"])
    assert_ratio(run["ratios"]["size_smaller"])

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

    serving = figures(results["sections"]["serving"])
    assert serving["latency"]["endpoint"]["p99"] >= serving["latency"]["endpoint"]["p50"] > 0
    assert list(serving["load"]["levels"]) == ["1 client", "4 clients"]
    assert_ratio(serving["load"]["scaling"]["4 clients"])

    executor = figures(results["sections"]["executor"])
    assert_spread(executor["executor"], "ms")
    assert_spread(executor["by_hand"], "ms")
    assert "--train-size" in executor["job_arguments"]

    assert "round 1/1" in stdout and "quantization tiny-test" in stdout   # progress lines


def test_targets_say_met_or_missed(smoke):
    _, results, _ = smoke
    ids = {t["id"] for t in results["targets"]}
    assert {"quantization.int8_dynamic_size.tiny-test", "quantization.int8_dynamic_latency.tiny-test",
            "distillation.student_latency.tiny-test", "serving.overhead", "serving.concurrency"} <= ids
    for item in results["targets"]:
        assert isinstance(item["met"], bool) and item["unit"] and isinstance(item["measured"], (int, float))


def test_markdown_has_every_section_and_its_chart(smoke):
    out, results, _ = smoke
    page = (out / "BENCHMARKS.md").read_text(encoding="utf-8")
    for section in results["sections"].values():
        assert f"## {section['title']}" in page
    for chart in ("quantization", "distillation", "pruning", "lora", "serving", "executor"):
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
