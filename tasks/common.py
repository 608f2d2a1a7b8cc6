"""What every ckptflow task shares: no result caching (steps are idempotent at the file level and
take plans, not tensors), retries only for failures a retry can fix, and a time limit.

Two knobs, read from the environment when a flow run starts (a deployment's job variables):
CKPTFLOW_TASK_RETRY_DELAY_SECONDS (the first retry's delay; later ones wait 5x and 15x that,
default 2 s) and CKPTFLOW_TASK_TIMEOUT_SECONDS (the longest one step may take, default 6 h).
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

from ckpt_core.io.retry import worth_another_run

__all__ = ["IO_RETRIES", "io_retries", "retry_transient", "task_timeout_seconds", "with_controls"]

T = TypeVar("T")
_BACKOFF = (1, 5, 15)  # x the first delay: a store that is back within a minute is caught


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's `retry_condition_fn`: retry a failed task run only when ckpt_core's rule
    (`retry.worth_another_run`) says a later try can succeed: transient errors, and storage
    errors that outlasted the IO retries. A missing file, a refused permission, a bad input or
    any other CkptError fails the task run at once."""
    try:
        state.result()
    except Exception as e:
        return worth_another_run(e)
    return False


def io_retries() -> dict[str, Any]:
    """The task options for IO steps, with the delays the environment asks for now."""
    first = float(os.environ.get("CKPTFLOW_TASK_RETRY_DELAY_SECONDS", "2"))
    return {
        "retries": len(_BACKOFF),
        "retry_delay_seconds": [first * k for k in _BACKOFF],
        "retry_jitter_factor": 0.5,  # parallel shards do not come back in lockstep
        "retry_condition_fn": retry_transient,
    }


# At import (the decorators): the defaults; `with_controls` applies the environment per run.
IO_RETRIES: dict[str, Any] = io_retries()


def task_timeout_seconds(given: float | None = None) -> float:
    """`given` when set, else CKPTFLOW_TASK_TIMEOUT_SECONDS, else six hours."""
    if given is not None:
        return given
    return float(os.environ.get("CKPTFLOW_TASK_TIMEOUT_SECONDS", str(6 * 3600)))


def with_controls(task: T, *, timeout_seconds: float | None = None, retries: bool = True) -> T:
    """`task` with this run's time limit and (for IO steps) retry delays from the environment."""
    options: dict[str, Any] = {"timeout_seconds": task_timeout_seconds(timeout_seconds)}
    if retries:
        options.update(io_retries())
    return task.with_options(**options)  # type: ignore[attr-defined,no-any-return]
