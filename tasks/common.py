"""What every ckptflow task shares: no result caching (steps are idempotent at the file level and
take plans, not tensors) and retries only for failures a retry can fix."""

from __future__ import annotations

from typing import Any

from ckpt_core.errors import StorageUnavailableError
from ckpt_core.io.retry import is_transient


def worth_a_retry(error: BaseException) -> bool:
    """ckpt_core's transient/permanent rule (`retry.is_transient`: a reset connection or a 5xx
    yes, a refused permission, a missing file or a bad input no), plus transient errors that
    outlasted the IO retries (`StorageUnavailableError`): a later try may find the store back."""
    return isinstance(error, StorageUnavailableError) or is_transient(error)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's `retry_condition_fn`: retry a failed task run only when `worth_a_retry`."""
    try:
        state.result()
    except Exception as e:
        return worth_a_retry(e)
    return False


IO_RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": [2, 10, 30],
    "retry_condition_fn": retry_transient,
}
