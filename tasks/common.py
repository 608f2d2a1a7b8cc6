"""What every ckptflow task shares: no result caching (steps are idempotent at the file level and
take plans, not tensors) and retries only for failures a retry can fix."""

from __future__ import annotations

from typing import Any

from ckpt_core.io.retry import worth_another_run


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's `retry_condition_fn`: retry a failed task run only when ckpt_core's rule
    (`retry.worth_another_run`) says a later try can succeed."""
    try:
        state.result()
    except Exception as e:
        return worth_another_run(e)
    return False


IO_RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": [2, 10, 30],
    "retry_condition_fn": retry_transient,
}
