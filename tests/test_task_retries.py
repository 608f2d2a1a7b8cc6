"""Prefect task retries follow ckpt_core's transient/permanent rule: the retry condition is
called on real Prefect states of real errors, nothing mocked."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError
from prefect.client.schemas.objects import State
from prefect.states import Completed, Failed

from ckpt_core.errors import (
    FormatError,
    PublishError,
    StorageFullError,
    StorageRefusedError,
    StorageUnavailableError,
)
from tasks.common import retry_transient


def _outlasted() -> StorageUnavailableError:
    try:
        try:
            raise ConnectionResetError(104, "Connection reset by peer")
        except ConnectionResetError as e:
            raise StorageUnavailableError("s3://b/x: storage kept failing after 6 tries") from e
    except StorageUnavailableError as e:
        return e


def _s3_error(code: str, status: int) -> ClientError:
    response = {
        "Error": {"Code": code, "Message": code},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "GetObject")


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
        (StorageRefusedError("s3://b/src/model.safetensors: does not exist"), False),
        (StorageFullError("/data/out: no space left"), False),
        (PublishError("/data/out: holds another conversion"), False),
        (_s3_error("SlowDown", 503), True),  # botocore, as s3fs may leave it
        (_s3_error("AccessDenied", 403), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_task_retry_condition_uses_the_io_rule(error: BaseException, retried: bool) -> None:
    state: State[Any] = Failed(data=error, message=str(error))
    assert retry_transient(None, None, state) is retried


def test_a_completed_task_is_not_retried() -> None:
    assert retry_transient(None, None, Completed(data=1)) is False
