"""stepkit.threads: one intra-op thread for small models at inference, the idle cores for training,
FLANOPS_THREADS over both; and the steps apply it (torch and CTranslate2 alike)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import STEPS
from stepkit.errors import StepError
from stepkit.threads import (MULTI_THREAD_PARAMETERS, ThreadsThatFit, free_cores, idle_cores, idle_cpus,
                             inference_threads, training_threads, usable_cpus)

pytestmark = pytest.mark.smoke   # the quick tier: pytest -m smoke


def test_small_models_generate_on_one_thread_and_big_ones_on_every_core(monkeypatch):
    monkeypatch.delenv("FLANOPS_THREADS", raising=False)
    assert inference_threads(1_584_640, cpus=8) == 1                  # the stand-in
    assert inference_threads(247_577_856, cpus=8) == 1                # flan-t5-base
    assert inference_threads(MULTI_THREAD_PARAMETERS, cpus=8) == 8    # flan-t5-large and up
    assert inference_threads(None, cpus=4) == 4                       # unknown size: every core


def test_flanops_threads_overrides_and_a_bad_value_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("FLANOPS_THREADS", "3")
    assert inference_threads(1000) == 3 and training_threads() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("FLANOPS_THREADS", bad)
        with pytest.raises(StepError, match=rf"FLANOPS_THREADS='{bad}': expected a whole number of at least 1"):
            inference_threads(1000)


def test_sagemaker_cpus_bound_the_usable_cores(monkeypatch):
    monkeypatch.setenv("SM_NUM_CPUS", "1")
    assert usable_cpus() == 1 and idle_cpus(0.05) == 1


def test_training_takes_the_idle_cores_not_the_busy_ones():
    # two /proc/stat samples 100 jiffies apart per core on 2 cores: idle share → idle cores
    assert idle_cores((0, 0), (200, 200), cores=2, usable=2) == 2      # nothing else running
    assert idle_cores((0, 0), (100, 200), cores=2, usable=2) == 1      # one core busy with other work
    assert idle_cores((0, 0), (3, 200), cores=2, usable=2) == 1        # both busy: still one thread, never 0
    assert idle_cores((0, 0), (800, 800), cores=8, usable=2) == 2      # an affinity mask of 2 caps it
    assert idle_cores((5, 5), (5, 5), cores=2, usable=2) == 2          # no time passed: assume idle


def test_training_gives_back_a_core_that_other_work_takes_while_it_runs():
    """free_cores(before, after): (idle, total, own) ticks; 100 ticks per core on 2 cores between the samples."""
    assert free_cores((0, 0, 0), (100, 200, 100), cores=2, usable=2) == 2   # we use a core, the other idle
    assert free_cores((0, 0, 0), (0, 200, 200), cores=2, usable=2) == 2     # we use both
    assert free_cores((0, 0, 0), (0, 200, 100), cores=2, usable=2) == 1     # another process took the other one
    assert free_cores((0, 0, 0), (40, 200, 100), cores=2, usable=2) == 1    # ... or most of it
    assert free_cores((0, 0, 0), (80, 200, 100), cores=2, usable=2) == 2    # a fifth of a core: still ours
    assert free_cores((5, 5, 5), (5, 5, 5), cores=2, usable=2) is None      # no time passed: no opinion
    fit = ThreadsThatFit(usable=2)
    assert fit.check() in (1, 2, None)   # real /proc readings: some answer, never 0


def test_every_core_busy_leaves_training_one_thread():
    """Measured for real: with a busy loop on every core (this test's own affinity reset to all of them)."""
    script = ("import os, subprocess, sys, time; sys.path.insert(0, sys.argv[1])\n"
              "os.sched_setaffinity(0, range(os.cpu_count()))\n"
              "from stepkit.threads import idle_cpus\n"
              "burners = [subprocess.Popen([sys.executable, '-c', 'while True: pass']) for _ in range(os.cpu_count())]\n"
              "time.sleep(0.5)\n"
              "try:\n    print(idle_cpus(0.5))\n"
              "finally:\n    [b.kill() for b in burners]\n")
    result = subprocess.run([sys.executable, "-c", script, str(STEPS)], capture_output=True, text=True, timeout=60,
                            env={k: v for k, v in os.environ.items() if k not in ("SM_NUM_CPUS", "FLANOPS_THREADS")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"


def test_steps_use_the_policy(tmp_path):
    """configure_runtime sets torch (and OMP_NUM_THREADS, which accelerate reads) to the policy's count."""
    script = ("import os, sys; sys.path.insert(0, sys.argv[1]); import torch\n"
              "from stepkit.threads import configure_runtime\n"
              "print(configure_runtime(1_000_000), torch.get_num_threads(), os.environ['OMP_NUM_THREADS'])\n"
              "print(configure_runtime(), torch.get_num_threads())")
    result = subprocess.run([sys.executable, "-c", script, str(STEPS)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "SM_NUM_CPUS": "2", "FLANOPS_THREADS": ""})
    assert result.returncode == 0, result.stderr
    inference, training = result.stdout.split("\n")[:2]
    assert inference == "1 1 1"
    count, torch_threads = map(int, training.split())
    assert count == torch_threads and 1 <= count <= 2
