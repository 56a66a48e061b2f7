"""Serving: the local endpoint (flanops.serving, the artifact's own code/inference.py) vs the bare model.

The first model is packaged as the pipeline packages it (stepkit.modeling.package_model: a
model.tar.gz with code/inference.py) and served on a loopback port by ``flanops.serving.serving``.
Overhead: per-request latency of ``POST /invocations`` (one keep-alive HTTP connection) vs
``stepkit.modeling.summarize`` (tokenize → generate → decode, what the handler's predict_fn
calls) on the same loaded model, the same dialogues and the same generation parameters, at
batch 1, interleaved. Throughput: requests per second with 1, 4 and 16 concurrent clients
(threads, one keep-alive connection each), each level a bounded loop: clients send requests
until the level's time is up and finish the request in flight.
"""
from __future__ import annotations

import http.client
import json
import statistics
import threading
import time
from urllib.parse import urlsplit

from ..steps.stepkit.cost import percentile
from ..steps.stepkit.modeling import package_model, summarize
from .harness import BenchSettings, Progress, SectionResult, interleaved, quantity, ratio, spread, target
from .subjects import Workspace, dialogues

TITLE = "Serving"
ENDPOINT_NAME = "flanops-bench"


def clients_label(count: int) -> str:
    return f"{count} client{'s' if count != 1 else ''}"


class Client:
    """One keep-alive HTTP connection to ``POST /invocations``."""

    def __init__(self, url: str, parameters: dict):
        parts = urlsplit(url)
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
        self.parameters = parameters

    def summarize(self, dialogue: str) -> str:
        body = json.dumps({"inputs": dialogue, "parameters": self.parameters}).encode()
        self.connection.request("POST", "/invocations", body=body,
                                headers={"Content-Type": "application/json", "Accept": "application/json"})
        response = self.connection.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"the endpoint answered {response.status}: {payload[:300]!r}")
        return json.loads(payload)[0]["generated_text"]

    def close(self) -> None:
        self.connection.close()


def load_level(url: str, parameters: dict, texts: list[str], clients: int, seconds: float) -> dict:
    """``clients`` threads send requests until ``seconds`` have passed (in-flight requests finish)."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    started = time.perf_counter()
    deadline = started + seconds

    def work(index: int) -> None:
        client = Client(url, parameters)
        try:
            count = 0
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                client.summarize(texts[(index + count * clients) % len(texts)])
                latencies[index].append(1000 * (time.perf_counter() - sent))
                count += 1
        except Exception as err:   # noqa: BLE001 - reported with the level, not lost in a thread
            errors.append(f"{type(err).__name__}: {err}")
        finally:
            client.close()

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} of {clients} clients failed; first: {errors[0]}")
    done = [value for per_client in latencies for value in per_client]
    return {"requests": len(done), "seconds": elapsed, "latencies_ms": done}


def forget_handler() -> None:
    """Drop the served artifact's ``inference``/``stepkit`` modules and code/ path (its folder is gone now).

    flanops.serving imports code/inference.py as the toolkit does (``code/`` on sys.path); left
    behind, a later ``import stepkit.…`` in this process (a step script imported by the pipeline
    config check) would look in the removed folder.
    """
    import sys

    for name in [n for n in sys.modules if n == "inference" or n == "stepkit" or n.startswith("stepkit.")]:
        del sys.modules[name]
    sys.path[:] = [p for p in sys.path if not (p.endswith("/code") and "flanops-endpoint-" in p)]


def run(settings: BenchSettings, workspace: Workspace, progress: Progress) -> SectionResult:
    from ..serving import serving

    spec = settings.models[0]
    label = f"serving {spec.name}"
    source = workspace.fp32(spec, settings.seed)
    progress(f"{label}: packaging model.tar.gz (package_model) and starting the local endpoint")
    archive = package_model(source, workspace.folder("serving") / "model.tar.gz")
    parameters = {"max_new_tokens": settings.new_tokens, "min_new_tokens": settings.new_tokens}
    texts = [row["dialogue"] for row in dialogues(max(settings.serving_inputs, max(settings.load_clients)),
                                                  seed=settings.seed + 2)]
    log: list[str] = []
    with serving(archive, None, ENDPOINT_NAME, log=log.append) as server:
        loaded = server.model.model   # the handler's Summarizer: the very model the endpoint serves
        client = Client(server.url, parameters)
        cursor = {"endpoint": 0, "bare": 0}

        def next_text(side: str) -> str:
            text = texts[cursor[side] % settings.serving_inputs]
            cursor[side] += 1
            return text

        sides = {"endpoint": lambda: client.summarize(next_text("endpoint")),
                 "bare": lambda: summarize(loaded.model, loaded.tokenizer, [next_text("bare")], batch_size=1,
                                           **parameters)}
        latency = interleaved(sides, settings.warmup, settings.repeats * settings.serving_inputs, progress,
                              f"{label} batch 1")
        client.close()
        levels = {clients_label(c): c for c in settings.load_clients}
        load_runs: dict[str, list[dict]] = {name: [] for name in levels}

        def level(name: str):
            result = load_level(server.url, parameters, texts, levels[name], settings.load_seconds)
            load_runs[name].append(result)
            return result

        throughput = interleaved({name: (lambda n=name: level(n)) for name in levels}, 0, settings.load_repeats,
                                 progress, f"{label} load ({settings.load_seconds:g} s per level)", unit="req/s",
                                 measure=lambda _n, _s, result: result["requests"] / result["seconds"])
    forget_handler()
    endpoint, bare = latency["endpoint"], latency["bare"]
    overhead = ratio(endpoint, bare, "endpoint latency / bare summarize latency, batch 1 (p50 over p50)")
    overhead_percent = round(100 * (statistics.median(endpoint) / statistics.median(bare) - 1), 2)
    per_level = {}
    for name, runs in load_runs.items():
        all_latencies = [value for run in runs for value in run["latencies_ms"]]
        per_level[name] = {"clients": levels[name], "throughput": spread(throughput[name], "requests/s"),
                           "requests": quantity(sum(run["requests"] for run in runs), "requests"),
                           "latency_p50": quantity(round(percentile(all_latencies, 50), 3), "ms"),
                           "latency_p99": quantity(round(percentile(all_latencies, 99), 3), "ms")}
    first = clients_label(settings.load_clients[0])
    scaling = {name: ratio(throughput[name], throughput[first], f"throughput with {name} / with {first}")
               for name in levels if name != first}
    figures = {
        "model": spec.card(), "artifact_bytes": quantity(archive.stat().st_size, "bytes"),
        "parameters": parameters, "dialogues": settings.serving_inputs,
        "client": "http.client keep-alive connection to POST /invocations on 127.0.0.1 (threads of this process)",
        "bare": "stepkit.modeling.summarize on the endpoint's loaded model (tokenize, generate, decode)",
        "latency": {"endpoint": {**spread(endpoint, "ms"), "p50": round(percentile(endpoint, 50), 3),
                                 "p99": round(percentile(endpoint, 99), 3)},
                    "bare": {**spread(bare, "ms"), "p50": round(percentile(bare, 50), 3),
                             "p99": round(percentile(bare, 99), 3)}},
        "overhead": {"ratio": overhead, "percent": quantity(overhead_percent, "%")},
        "load": {"seconds_per_level": settings.load_seconds, "levels": per_level, "scaling": scaling},
    }
    four = clients_label(4)
    targets = [target("serving.overhead", "endpoint overhead at most 5% over bare generation at batch 1 (p50)",
                      overhead_percent, "%", 5.0, at_least=False)]
    if four in scaling:
        targets.append(target("serving.concurrency", "throughput with 4 clients at least 1.5x that with 1 client",
                              scaling[four]["value"], "x", 1.5, at_least=True))
    return SectionResult(figures=figures, targets=targets,
                         notes=["The local endpoint serves one prediction at a time (a lock, as flanops.serving "
                                "documents); concurrent clients can only fill the gaps between requests."])
