"""Dynamic batching (stepkit/batching.py, used by code/inference.py): concurrent requests share
generate calls, each gets exactly the answer it gets alone, a bad request fails alone, and an
overloaded endpoint refuses with 429/503 saying why while it goes on serving."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import run_step
from stepkit.batching import Batcher, Refused
from stepkit.records import read_split


def echo_generate(calls: list, delay: float = 0.05):
    """A stand-in model: summary = the dialogue upper-cased (+ settings), slow enough for requests to queue."""
    def generate(dialogues, settings):
        calls.append((list(dialogues), dict(settings)))
        time.sleep(delay)
        if any("explode" in d for d in dialogues):
            raise RuntimeError("the model failed on this input")
        return [d.upper() + ("!" * settings.get("num_beams", 1)) for d in dialogues]
    return generate


def submit_all(batcher: Batcher, requests: list[tuple[list[str], dict]]) -> list:
    def one(request):
        try:
            return batcher.submit(*request)
        except Exception as err:  # noqa: BLE001 - returned to the test to look at
            return err
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        return list(pool.map(one, requests))


def test_concurrent_requests_share_generate_calls_and_each_gets_its_own_answers():
    calls: list = []
    batcher = Batcher(echo_generate(calls), max_dialogues=32, max_wait_s=0.02)
    requests = [([f"dialogue {i}", f"second {i}"], {}) for i in range(8)]
    answers = submit_all(batcher, requests)
    assert answers == [[f"DIALOGUE {i}!", f"SECOND {i}!"] for i in range(8)]
    assert len(calls) < 8 and batcher.stats.largest_batch > 2   # batched, not one call per request
    assert batcher.stats.requests == 8


def test_requests_with_different_settings_never_share_a_call():
    calls: list = []
    batcher = Batcher(echo_generate(calls), max_wait_s=0.02)
    answers = submit_all(batcher, [([f"d{i}"], {"num_beams": 1 + i % 2}) for i in range(6)])
    assert answers == [[f"D{i}" + "!" * (1 + i % 2)] for i in range(6)]
    for dialogues, settings in calls:
        assert all(int(d[1:]) % 2 + 1 == settings.get("num_beams", 1) for d in dialogues), calls


def test_a_request_that_fails_in_a_batch_fails_alone():
    calls: list = []
    batcher = Batcher(echo_generate(calls), max_wait_s=0.05)
    requests = [(["fine 1"], {}), (["explode"], {}), (["fine 2"], {}), (["fine 3"], {})]
    answers = submit_all(batcher, requests)
    assert isinstance(answers[1], RuntimeError) and "this input" in str(answers[1])
    assert [answers[0], answers[2], answers[3]] == [["FINE 1!"], ["FINE 2!"], ["FINE 3!"]]
    assert batcher.submit(["still serving"], {}) == ["STILL SERVING!"]


def test_a_full_queue_refuses_with_429_and_a_stale_request_gives_up_with_503():
    release = threading.Event()

    def stuck(dialogues, settings):
        release.wait(10)
        return dialogues

    batcher = Batcher(stuck, max_queue=2, queue_timeout_s=0.5, max_wait_s=0,
                      limit_names={"max_queue": "FLANOPS_MAX_QUEUE", "queue_timeout_s": "FLANOPS_QUEUE_TIMEOUT_S"})
    running = threading.Thread(target=batcher.submit, args=(["first"], {}))
    running.start()
    time.sleep(0.1)                     # the worker is busy with "first"
    waiting = [None, None]
    threads = [threading.Thread(target=lambda i=i: waiting.__setitem__(i, submit_all(batcher, [([f"q{i}"], {})])[0]))
               for i in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(0.1)                     # two requests queued: the queue is full
    with pytest.raises(Refused) as full:
        batcher.submit(["one too many"], {})
    assert full.value.status_code == 429
    assert "2 requests are already waiting" in str(full.value) and "FLANOPS_MAX_QUEUE" in str(full.value)
    for thread in threads:
        thread.join()
    assert all(isinstance(w, Refused) and w.status_code == 503 for w in waiting), waiting
    assert "waited 0.5 s without starting" in str(waiting[0]) and "FLANOPS_QUEUE_TIMEOUT_S" in str(waiting[0])
    release.set()
    running.join()
    assert batcher.submit(["after"], {}) == ["after"]   # still serving


# ----------------------------------------------------------------------------- through code/inference.py


@pytest.fixture(scope="module")
def variants(chain, tmp_path_factory):
    """The fine-tuned fp32 model and its ct2-int8 conversion: the two runtimes the handler batches."""
    ct2 = tmp_path_factory.mktemp("batching") / "ct2-int8"
    run_step("quantize.py", "--model-dir", str(chain["tuned"]), "--method", "ct2-int8", "--output-dir", str(ct2))
    return {"fp32": chain["tuned"], "ct2-int8": ct2}


@pytest.mark.parametrize("variant", ["fp32", "ct2-int8"])
def test_the_handler_answers_concurrent_requests_as_it_answers_each_alone(chain, variants, variant):
    from flanops.steps import inference

    summarizer = inference.model_fn(str(variants[variant]))
    dialogues = [row["dialogue"] for row in read_split(chain["data"], "test")[:24]]

    def ask(body) -> tuple[int, object]:
        try:
            request = inference.input_fn(json.dumps(body), "application/json")
            return 200, json.loads(inference.output_fn(inference.predict_fn(request, summarizer), "application/json"))
        except inference.RequestError as err:
            return err.status_code, str(err)

    alone = [ask({"inputs": dialogue})[1][0]["generated_text"] for dialogue in dialogues]
    bodies = [{"inputs": dialogue} for dialogue in dialogues]
    bodies.insert(5, {"inputs": dialogues[0], "parameters": {"max_new_tokens": 10**6}})   # refused on its own
    bodies.insert(11, {"inputs": ""})
    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(pool.map(ask, bodies))
    bad = [replies.pop(11), replies.pop(5)]
    assert [status for status, _ in bad] == [400, 400] and "max_new_tokens" in bad[1][1] and "empty" in bad[0][1]
    assert [status for status, _ in replies] == [200] * len(dialogues)
    assert [reply[0]["generated_text"] for _, reply in replies] == alone
    assert summarizer.batcher.stats.largest_batch > 1   # they did share generate calls


def test_the_local_endpoint_answers_429_when_its_queue_is_full_and_goes_on_serving(chain, tmp_path, monkeypatch):
    """flanops serve's request path (serving.LoadedModel) with a queue of one: of several requests sent at once
    while one generates, the one that fits waits and the rest get 429 saying why; afterwards all is served."""
    import sys

    from flanops.infra.serving import LoadedModel
    from test_inference_handler import packaged

    monkeypatch.setenv("FLANOPS_MAX_QUEUE", "1")
    monkeypatch.setenv("FLANOPS_BATCH_WAIT_MS", "1")
    for name in [n for n in sys.modules if n == "inference"]:
        monkeypatch.delitem(sys.modules, name)   # the handler reads its limits when imported
    loaded = LoadedModel(packaged(chain["tuned"], tmp_path / "artifact"))
    dialogue = read_split(chain["data"], "test")[0]["dialogue"]
    long = {"max_new_tokens": 256, "min_new_tokens": 256}
    slow = json.dumps({"inputs": dialogue, "parameters": long}).encode()
    slowest = json.dumps({"inputs": [dialogue] * 16, "parameters": long}).encode()   # seconds of work
    with ThreadPoolExecutor(max_workers=6) as pool:
        first = pool.submit(loaded.invoke, slowest, "application/json", "application/json")
        time.sleep(0.3)   # generating: the queue is empty again, one more fits
        replies = list(pool.map(lambda _: loaded.invoke(slow, "application/json", "application/json"), range(5)))
        replies.append(first.result())
    statuses = sorted(reply.status for reply in replies)
    assert statuses.count(429) >= 3 and statuses.count(200) >= 2, statuses
    refused = next(reply for reply in replies if reply.status == 429)
    assert "requests are already waiting" in json.loads(refused.body)["error"]
    assert "FLANOPS_MAX_QUEUE" in json.loads(refused.body)["error"]
    again = loaded.invoke(json.dumps({"inputs": dialogue}).encode(), "application/json", "application/json")
    assert again.status == 200 and json.loads(again.body)[0]["generated_text"]
