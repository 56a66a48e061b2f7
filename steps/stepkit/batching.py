"""Dynamic batching: concurrent requests to one model answered by shared ``generate`` calls.

An endpoint that runs one request at a time leaves its cores idle between tokens and pays the
per-step cost of decoding once per request; a batch pays it once for all its rows. Requests
wait in a queue; each worker takes the oldest and every queued request with the same
generation settings (up to ``max_dialogues`` dialogues), generates them together and hands each
request its own summaries. While another batch is generating it waits at most ``max_wait_s``
for more to arrive; with nothing else running a request goes at once. Under load, batches form
by themselves while the previous one runs.

A dialogue's summary does not depend on what it is batched with (greedy and beam search give
the same tokens alone and in a batch: checked by tests/test_batching.py on every variant).
A request that fails inside a batch is retried alone, so an error stays with the request that
caused it. A full queue refuses at once (429), and a request that waited longer than
``queue_timeout_s`` without starting gives up (503): both say why, and the server goes on.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

Generate = Callable[[list[str], dict[str, Any]], list[str]]   # (dialogues, settings) -> summaries


class Refused(Exception):
    """A request the batcher cannot take; ``status_code`` is 429 (queue full) or 503 (waited too long)."""

    def __init__(self, message: str, status_code: int):
        super().__init__(message)
        self.status_code = status_code


@dataclass
class _Pending:
    dialogues: list[str]
    settings: dict[str, Any]
    key: tuple
    done: threading.Event = field(default_factory=threading.Event)
    started: bool = False
    result: list[str] | None = None
    error: BaseException | None = None


@dataclass
class BatchStats:
    batches: int = 0
    requests: int = 0
    largest_batch: int = 0     # dialogues


class Batcher:
    """Queue + ``workers`` threads that call ``generate`` on batches of compatible requests."""

    def __init__(self, generate: Generate, max_dialogues: int = 32, max_wait_s: float = 0.002,
                 max_queue: int = 64, queue_timeout_s: float = 50.0, workers: int = 1,
                 limit_names: dict[str, str] | None = None):
        self.generate, self.max_dialogues, self.max_wait_s = generate, max_dialogues, max_wait_s
        self.max_queue, self.queue_timeout_s = max_queue, queue_timeout_s
        self.limit_names = limit_names or {}
        self.stats = BatchStats()
        self._running = 0   # batches being generated now
        self._queue: collections.deque[_Pending] = collections.deque()
        self._changed = threading.Condition()
        self._threads = [threading.Thread(target=self._work, name=f"batcher-{index}", daemon=True)
                         for index in range(max(1, workers))]
        for thread in self._threads:
            thread.start()

    def submit(self, dialogues: list[str], settings: dict[str, Any]) -> list[str]:
        """The summaries of ``dialogues``, generated with ``settings`` in a batch with other requests."""
        pending = _Pending(list(dialogues), dict(settings), tuple(sorted(settings.items())))
        with self._changed:
            if len(self._queue) >= self.max_queue:
                raise Refused(f"the endpoint is busy: {len(self._queue)} requests are already waiting (at most "
                              f"{self.max_queue}, the endpoint's {self.limit_names.get('max_queue', 'queue limit')}); "
                              "retry after a short backoff", 429)
            self._queue.append(pending)
            self._changed.notify()
        if not pending.done.wait(self.queue_timeout_s):
            with self._changed:
                if not pending.started:   # still queued: withdraw it, nothing will run it
                    self._queue.remove(pending)
                    raise Refused(f"the request waited {self.queue_timeout_s:g} s without starting (the endpoint's "
                                  f"{self.limit_names.get('queue_timeout_s', 'queue timeout')}): the endpoint is "
                                  "overloaded; retry later or send fewer dialogues per request", 503)
            pending.done.wait()   # started: it finishes
        if pending.error is not None:
            raise pending.error
        return pending.result

    def _take_batch(self) -> list[_Pending]:
        """The oldest request and the queued ones it can share a generate call with (called holding the lock)."""
        while not self._queue:
            self._changed.wait()
        first = self._queue.popleft()
        batch, size = [first], len(first.dialogues)
        # Company is worth waiting for only under load (another batch generating); alone, go at once
        deadline = time.monotonic() + (self.max_wait_s if self._running else 0.0)
        while size < self.max_dialogues:
            for pending in list(self._queue):
                if pending.key == first.key and size + len(pending.dialogues) <= self.max_dialogues:
                    self._queue.remove(pending)
                    batch.append(pending)
                    size += len(pending.dialogues)
            remaining = deadline - time.monotonic()
            if size >= self.max_dialogues or remaining <= 0:
                break
            self._changed.wait(remaining)
        for pending in batch:
            pending.started = True
        self._running += 1
        return batch

    def _work(self) -> None:
        while True:
            with self._changed:
                batch = self._take_batch()
            try:
                self._run(batch)
            finally:
                with self._changed:
                    self._running -= 1

    def _run(self, batch: list[_Pending]) -> None:
        dialogues = [dialogue for pending in batch for dialogue in pending.dialogues]
        try:
            summaries = self.generate(dialogues, batch[0].settings)
        except BaseException as err:   # noqa: BLE001 - handed to the request(s), never kills the worker
            if len(batch) > 1:   # find the request that caused it: each alone
                for pending in batch:
                    self._run([pending])
                return
            batch[0].error = err
            batch[0].done.set()
            return
        with self._changed:
            self.stats.batches += 1
            self.stats.requests += len(batch)
            self.stats.largest_batch = max(self.stats.largest_batch, len(dialogues))
        start = 0
        for pending in batch:
            pending.result = summaries[start:start + len(pending.dialogues)]
            start += len(pending.dialogues)
            pending.done.set()
