"""What every ckptflow task shares: no result caching (steps are idempotent at the file level and
take plans, not tensors) and retries only for failures a retry can fix."""

from __future__ import annotations

from typing import Any

from ckpt_core.errors import CkptError


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry IO hiccups; an expected failure (bad input, refused destination) fails at once."""
    try:
        state.result()
    except CkptError:
        return False
    except Exception:
        return True
    return False


IO_RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": [2, 10, 30],
    "retry_condition_fn": retry_transient,
}
