"""Serving: the variant the pipeline registers by default (ct2-int8) through the local endpoint, alone and under load.

The first model's ct2-int8 (steps/quantize.py, the pipeline's default quantize method) is
packaged as the pipeline packages it (stepkit.packaging.package_model: a model.tar.gz with
code/inference.py) and served on a loopback port by ``flanops.infra.serving.serving``, the code
``flanops serve`` runs. Every request generates exactly ``new_tokens`` tokens
(min_new_tokens = max_new_tokens) from a dialogue of a pool of distinct ones.

  Alone: each dialogue of the pool sent by itself (one client): its answer alone.
  Overhead: per-request latency of ``POST /invocations`` (one keep-alive HTTP connection) vs
    ``stepkit.generation.summarize`` (tokenize → generate → decode) on the same loaded model, the
    same dialogues and generation parameters, at batch 1, interleaved.
  Load: 1, 8 (and more) concurrent clients (threads, one keep-alive connection each), each level
    a bounded loop: clients send the pool's dialogues in turn until the level's time is up and
    finish the request in flight. Throughput (requests/s), latency percentiles per request, and
    every answer compared with the same dialogue's answer alone (code/inference.py batches
    concurrent requests: a summary must not depend on its batch).
"""
from __future__ import annotations

import http.client
import itertools
import json
import statistics
import threading
import time
from urllib.parse import urlsplit

from stepkit.cost import percentile
from stepkit.generation import summarize
from stepkit.packaging import package_model
from .harness import BenchSettings, Progress, SectionResult, interleaved, quantity, ratio, spread, target
from .subjects import Workspace, dialogues

TITLE = "Serving"
ENDPOINT_NAME = "flanops-bench"
VARIANT = "ct2-int8"      # configs' quantize method: what the pipeline registers by default
HEADLINE_CLIENTS = 8      # the issue's: throughput with 8 clients vs 1, and every answer as alone
SCALING_TARGET = 3.0


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
    """``clients`` threads send the pool's dialogues in turn until ``seconds`` have passed (in-flight requests finish).

    Returns the requests' latencies and (dialogue index, answer) pairs.
    """
    latencies: list[list[float]] = [[] for _ in range(clients)]
    answers: list[list[tuple[int, str]]] = [[] for _ in range(clients)]
    errors: list[str] = []
    turn = itertools.count()   # shared: requests in flight at once carry distinct dialogues
    started = time.perf_counter()
    deadline = started + seconds

    def work(index: int) -> None:
        client = Client(url, parameters)
        try:
            while time.perf_counter() < deadline:
                text_index = next(turn) % len(texts)
                sent = time.perf_counter()
                answer = client.summarize(texts[text_index])
                latencies[index].append(1000 * (time.perf_counter() - sent))
                answers[index].append((text_index, answer))
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
    return {"requests": sum(map(len, latencies)), "seconds": elapsed,
            "latencies_ms": [value for per_client in latencies for value in per_client],
            "answers": [pair for per_client in answers for pair in per_client]}


def forget_handler() -> None:
    """Drop the served artifact's ``inference`` module and code/ path (its folder is gone now).

    flanops.infra.serving imports code/inference.py as the toolkit does (``code/`` on sys.path); left
    behind, a later import in this process could look in the removed folder.
    """
    import sys

    sys.modules.pop("inference", None)
    sys.path[:] = [p for p in sys.path if not (p.endswith("/code") and "flanops-endpoint-" in p)]


def percentiles(latencies: list[float]) -> dict:
    figures = {f"latency_p{p}": quantity(round(percentile(latencies, p), 3), "ms") for p in (50, 95, 99)}
    figures["latency_max"] = quantity(round(max(latencies), 3), "ms")
    return figures


def run(settings: BenchSettings, workspace: Workspace, progress: Progress) -> SectionResult:
    from flanops.infra.serving import serving

    spec = settings.models[0]
    label = f"serving {spec.name} {VARIANT}"
    progress(f"{label}: making it with steps/quantize.py")
    folder = workspace.variant(spec, VARIANT, settings.seed)
    progress(f"{label}: packaging model.tar.gz (package_model) and starting the local endpoint")
    archive = package_model(folder, workspace.folder("serving") / "model.tar.gz")
    parameters = {"max_new_tokens": settings.new_tokens, "min_new_tokens": settings.new_tokens}
    pool = max(settings.serving_inputs, 2 * max(settings.load_clients))
    texts = [row["dialogue"] for row in dialogues(pool, seed=settings.seed + 2)]
    log: list[str] = []
    with serving(archive, None, ENDPOINT_NAME, log=log.append) as server:
        loaded = server.model.model   # the handler's Summarizer: the very model the endpoint serves
        client = Client(server.url, parameters)
        progress(f"{label}: each of {pool} dialogues alone")
        alone = [client.summarize(text) for text in texts]
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

        stats = loaded.batcher.stats

        def level(name: str):
            batches, requests = stats.batches, stats.requests
            result = load_level(server.url, parameters, texts, levels[name], settings.load_seconds)
            result.update(batches=stats.batches - batches, batched=stats.requests - requests)
            load_runs[name].append(result)
            return result

        throughput = interleaved({name: (lambda n=name: level(n)) for name in levels}, 0, settings.load_repeats,
                                 progress, f"{label} load ({settings.load_seconds:g} s per level)", unit="req/s",
                                 measure=lambda _n, _s, result: result["requests"] / result["seconds"])
        runtime = {"runtime": getattr(loaded.model, "runtime", "transformers"),
                   "threads": getattr(loaded.model, "threads", None), "workers": getattr(loaded.model, "workers", 1),
                   "largest_batch": stats.largest_batch}
    forget_handler()
    endpoint, bare = latency["endpoint"], latency["bare"]
    overhead = ratio(endpoint, bare, "endpoint latency / bare summarize latency, batch 1 (p50 over p50)")
    overhead_percent = round(100 * (statistics.median(endpoint) / statistics.median(bare) - 1), 2)
    per_level = {}
    for name, runs in load_runs.items():
        all_latencies = [value for run in runs for value in run["latencies_ms"]]
        answers = [pair for run in runs for pair in run["answers"]]
        batches = sum(run["batches"] for run in runs)
        per_level[name] = {"clients": levels[name], "throughput": spread(throughput[name], "requests/s"),
                           "requests": quantity(len(all_latencies), "requests"), **percentiles(all_latencies),
                           "requests_per_batch": quantity(round(sum(run["batched"] for run in runs) / batches, 2)
                                                          if batches else None, "requests",
                                                          meaning="requests answered per shared generate call"),
                           "mismatches": quantity(sum(answer != alone[index] for index, answer in answers), "answers",
                                                  meaning="answers that differ from the same dialogue's answer alone")}
    first = clients_label(settings.load_clients[0])
    scaling = {name: ratio(throughput[name], throughput[first], f"throughput with {name} / with {first}")
               for name in levels if name != first}
    figures = {
        "model": spec.card(), "variant": VARIANT, "artifact_bytes": quantity(archive.stat().st_size, "bytes"),
        "parameters": parameters, "dialogues": pool, "served": runtime,
        "client": "http.client keep-alive connection to POST /invocations on 127.0.0.1 (threads of this process)",
        "bare": "stepkit.generation.summarize on the endpoint's loaded model (tokenize, generate, decode)",
        "latency": {side: {**spread(samples, "ms"), **{f"p{p}": round(percentile(samples, p), 3) for p in (50, 95, 99)}}
                    for side, samples in (("endpoint", endpoint), ("bare", bare))},
        "overhead": {"ratio": overhead, "percent": quantity(overhead_percent, "%")},
        "load": {"seconds_per_level": settings.load_seconds, "levels": per_level, "scaling": scaling},
    }
    targets = [target("serving.overhead", "endpoint overhead at most 5% over bare generation at batch 1 (p50)",
                      overhead_percent, "%", 5.0, at_least=False)]
    headline = clients_label(HEADLINE_CLIENTS)
    if headline in scaling:
        targets.append(target("serving.concurrency", f"{VARIANT} endpoint: throughput with {headline} at least "
                              f"{SCALING_TARGET:g}x that with {first}", scaling[headline]["value"], "x",
                              SCALING_TARGET, at_least=True))
        targets.append(target("serving.consistency", f"{VARIANT} endpoint: every answer under {headline} equals the "
                              "same dialogue's answer alone (mismatches)",
                              per_level[headline]["mismatches"]["value"], "answers", 0, at_least=False))
    return SectionResult(figures=figures, targets=targets,
                         notes=["code/inference.py batches concurrent requests (stepkit.batching): requests with the "
                                "same generation settings share generate calls, a CTranslate2 model runs one batch per "
                                "core group at once (served: its threads and workers); requests per batch: how many "
                                "requests a shared generate call answered on average at that level."])
