"""A step's RetryPolicies, applied as SageMaker applies them, with the waits capped for local runs.

A policy names exception types (``ExceptionType``), the wait before the first retry (``IntervalSeconds``,
default 1), its growth per retry (``BackoffRate``, default 2) and when to give up: ``MaxAttempts`` retries
after the first attempt, or ``ExpireAfterMin`` minutes after it. Which local failure is which exception
type is the failure's own (failures.StepFailed.exception_type; README's local executor section lists them).
SageMaker waits as long as the policy says (up to 12 hours); here each wait is capped at
``FLANOPS_RETRY_MAX_INTERVAL`` seconds (default 5), so a policy meant for a cloud's capacity does not
stall a laptop.
"""
from __future__ import annotations

import contextlib
import math
import os

from .errors import FlanopsError

MAX_INTERVAL_ENV = "FLANOPS_RETRY_MAX_INTERVAL"
DEFAULT_MAX_INTERVAL = 5.0


def max_interval() -> float:
    """The cap on each wait between attempts, in seconds."""
    text = os.environ.get(MAX_INTERVAL_ENV, "").strip() or str(DEFAULT_MAX_INTERVAL)
    with contextlib.suppress(ValueError):
        if 0 <= float(text) < math.inf:
            return float(text)
    raise FlanopsError(f"{MAX_INTERVAL_ENV}={text!r} is not a number of seconds; set it to e.g. 5, or unset it")


def matching_policy(step: dict, exception_type: str | None) -> dict | None:
    """The first of the step's retry policies that names this exception type."""
    if exception_type is None:
        return None
    return next((policy for policy in step.get("RetryPolicies", [])
                 if exception_type in policy.get("ExceptionType", [])), None)


def retry_wait(policy: dict, attempts: int, seconds_since_first: float) -> float | None:
    """Seconds to wait before attempt ``attempts + 1``, or None when the policy allows no more."""
    retries = attempts - 1
    if "MaxAttempts" in policy and retries >= int(policy["MaxAttempts"]):
        return None
    if "ExpireAfterMin" in policy and seconds_since_first >= float(policy["ExpireAfterMin"]) * 60:
        return None
    wait = float(policy.get("IntervalSeconds", 1)) * float(policy.get("BackoffRate", 2.0)) ** retries
    return min(wait, max_interval())
