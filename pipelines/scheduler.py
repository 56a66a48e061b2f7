"""When each step runs, how many run at once, and how an execution stops: the executor's loop over the step graph.

A step starts once every step it waits for has ended the way its run condition asks (stepgraph.py:
``Completed`` unless DependsOn names another trigger) and, in a condition's branch, once that condition
chose its branch; a step whose conditions can no longer be met is not run (SageMaker does not list it).
Up to ``max_parallel`` steps run at once, each in a thread of its own (a job is a process group of its
own, so the threads only wait). A failure that no step's run condition handles (``Failed`` or ``Any``)
ends the execution: nothing new starts, what runs finishes. A stop (SIGTERM, as StopPipelineExecution
sends it, or Ctrl-C; signal handlers only where this runs in the main thread) stops every running job's
process group and starts nothing more; a job that ignores SIGTERM is killed after ``KILL_AFTER_SECONDS``,
and a second signal kills at once.
"""
from __future__ import annotations

import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .stepgraph import COMPLETED, StepGraph

SUCCEEDED, FAILED, STOPPED, NOT_RUN = "Succeeded", "Failed", "Stopped", "NotRun"
MEETS = {COMPLETED: {SUCCEEDED}, "Failed": {FAILED}, "Stopped": {STOPPED}, "Any": {SUCCEEDED, FAILED, STOPPED}}
HANDLES_FAILURE = ("Failed", "Any")
STOPPED_BY_API = "stopped by StopPipelineExecution"
INTERRUPTED = "interrupted (Ctrl-C); `flanops run --resume` continues it"
STOP_REASONS = {signal.SIGTERM: STOPPED_BY_API, signal.SIGINT: INTERRUPTED}
KILL_AFTER_SECONDS = 10.0
STEP_THREAD = "step:"   # a step's thread is named step:<name> (the executor labels its lines with it)


def max_parallel_steps(configs: list[dict | None]) -> tuple[int, bool]:
    """``MaxParallelExecutionSteps`` of the first ParallelismConfiguration given, and whether it was given.

    SageMaker runs up to 50 steps at once by default; each local job uses every core of this machine,
    so without a configuration the executor runs one step at a time.
    """
    for config in configs:
        if config and config.get("MaxParallelExecutionSteps"):
            return max(1, int(config["MaxParallelExecutionSteps"])), True
    return 1, False


@dataclass
class Scheduler:
    graph: StepGraph
    run: Callable[[str], str]                    # runs one step (in its thread); returns its StepStatus
    decisions: dict[str, bool]                   # condition step → True when it chose its IfSteps
    stop_jobs: Callable[[str, bool], None]       # (why, force): stop every running job, start no more
    echo: Callable[[str], None] = print
    max_parallel: int = 1
    configured: bool = True                      # max_parallel came from a ParallelismConfiguration
    inbox: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    halted: str | None = None                    # the step whose unhandled failure ended the execution
    stop_reason: str | None = None
    stop_signal: int | None = None
    error: BaseException | None = None           # a step's unexpected exception (a bug): the caller re-raises it
    told_parallelism: bool = False

    def request_stop(self, reason: str, signum: int | None = None) -> None:
        """Stop the execution (from any thread, or a signal handler)."""
        self.inbox.put(("stop", reason, signum))

    def on_signal(self, signum: int, _frame) -> None:
        self.request_stop(STOP_REASONS.get(signum, f"stopped by signal {signum}"), signum)

    def execute(self, outcomes: dict[str, str], runnable: set[str]) -> dict[str, str]:
        """Run every runnable step not in ``outcomes`` (steps that ended earlier → their StepStatus) as far as the
        graph allows; ``outcomes`` gains each step's status (NotRun for those whose conditions were not met)."""
        pending = [name for name in self.graph.order() if name not in outcomes]
        for name in [n for n in pending if n not in runnable]:
            outcomes[name] = NOT_RUN
            pending.remove(name)
        running: dict[str, threading.Thread] = {}
        kill_at: float | None = None
        previous = self.install_handlers()
        try:
            while True:
                if self.stop_reason is None and self.halted is None:
                    self.start_ready(pending, outcomes, running)
                if not running:
                    return outcomes
                try:
                    message = self.inbox.get(timeout=0.5)
                except queue.Empty:
                    if kill_at is not None and time.monotonic() > kill_at:
                        self.stop_jobs(self.stop_reason or STOPPED_BY_API, True)
                        kill_at = None
                    continue
                if message[0] == "stop":
                    if self.stop_reason is None:
                        self.stop_reason, self.stop_signal = message[1], message[2]
                        self.echo(f"    stopping: {self.stop_reason}; killing {len(running)} running job(s)")
                        self.stop_jobs(self.stop_reason, False)
                        kill_at = time.monotonic() + KILL_AFTER_SECONDS
                    else:
                        self.stop_jobs(self.stop_reason, True)   # asked again: do not wait for them
                    continue
                _, name, status, error = message
                running.pop(name).join()
                outcomes[name] = status
                if error is not None and self.error is None:
                    self.error = error
                    self.stop_jobs(f"{name} raised {type(error).__name__}", True)
                    self.halted = name
                elif status == FAILED and self.halted is None and not self.handled(name):
                    self.halted = name
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def install_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}   # signals reach only the main thread; the caller stops us with request_stop
        return {signum: signal.signal(signum, self.on_signal) for signum in STOP_REASONS}

    def start_ready(self, pending: list[str], outcomes: dict[str, str], running: dict[str, threading.Thread]) -> None:
        settled = True
        while settled:   # a step that cannot run any more lets others know, at once
            settled = False
            for name in list(pending):
                if self.readiness(name, outcomes) == NOT_RUN:
                    outcomes[name] = NOT_RUN
                    pending.remove(name)
                    settled = True
        ready = [name for name in pending if self.readiness(name, outcomes) == "ready"]
        if len(ready) + len(running) > 1 and not self.configured and not self.told_parallelism:
            self.told_parallelism = True
            self.echo(f"note: {', '.join(list(running) + ready)} could run side by side; running one step at a time "
                      "because no ParallelismConfiguration sets MaxParallelExecutionSteps (each local job uses every "
                      "core of this machine; SageMaker's default is 50)")
        for name in ready[:max(0, self.max_parallel - len(running))]:
            pending.remove(name)
            thread = threading.Thread(target=self.work, args=(name,), name=f"{STEP_THREAD}{name}", daemon=True)
            running[name] = thread
            thread.start()

    def work(self, name: str) -> None:
        try:
            self.inbox.put(("done", name, self.run(name), None))
        except BaseException as error:   # a bug: the execution stops and the caller re-raises it
            self.inbox.put(("done", name, FAILED, error))

    def readiness(self, name: str, outcomes: dict[str, str]) -> str | None:
        """"ready", NOT_RUN (its conditions can no longer be met) or None (it still waits)."""
        upstream = {step: trigger for step, trigger in self.graph.upstream(name).items() if step in self.graph.steps}
        if any(step not in outcomes for step in upstream):
            return None
        if name in self.graph.branch_of:
            condition, branch = self.graph.branch_of[name]
            if outcomes[condition] != SUCCEEDED or self.decisions.get(condition) != branch:
                return NOT_RUN
        if any(outcomes[step] not in MEETS.get(trigger, ()) for step, trigger in upstream.items()):
            return NOT_RUN
        return "ready"

    def handled(self, name: str) -> bool:
        """Whether a step's run condition asks to run on this step's failure (so it does not end the execution)."""
        return any(self.graph.depends_on(other).get(name) in HANDLES_FAILURE for other in self.graph.steps)
