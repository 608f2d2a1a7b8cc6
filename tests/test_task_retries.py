"""Prefect task retries follow ckpt_core's transient/permanent rule: the retry condition is
called on real Prefect states of real errors, nothing mocked."""

from __future__ import annotations

import pytest
from prefect.states import Completed, Failed

from ckpt_core.errors import FormatError, StorageUnavailableError
from tasks.common import retry_transient


def _outlasted() -> StorageUnavailableError:
    try:
        try:
            raise ConnectionResetError(104, "Connection reset by peer")
        except ConnectionResetError as e:
            raise StorageUnavailableError("s3://b/x: storage kept failing after 6 tries") from e
    except StorageUnavailableError as e:
        return e


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (PermissionError(13, "Permission denied", "/data/out"), False),
        (FileNotFoundError(2, "No such file or directory", "/data/src"), False),
        (ConnectionResetError(104, "Connection reset by peer"), True),
        (TimeoutError("read timed out"), True),
        (_outlasted(), True),
        (FormatError("/data/src/model.safetensors: truncated"), False),
        (RuntimeError("a bug"), False),  # unknown: permanent, as for the IO retries
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_task_retry_condition_uses_the_io_rule(error: BaseException, retried: bool) -> None:
    state = Failed(data=error, message=str(error))
    assert retry_transient(None, None, state) is retried


def test_a_completed_task_is_not_retried() -> None:
    assert retry_transient(None, None, Completed(data=1)) is False
