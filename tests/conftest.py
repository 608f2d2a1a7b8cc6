"""Test session set-up: Prefect points at a temporary home with analytics off, before any test
module imports prefect; one session-scoped Prefect test harness for the few flow tests."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_PREFECT_HOME = tempfile.mkdtemp(prefix="ckptflow-prefect-home-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Prefect sets up its log handlers on import; importing it now, outside any test's capsys,
# keeps them off a captured stream that a test later closes.
import prefect  # noqa: E402,F401

from tests.helpers.deepspeed_truth import ds_root  # noqa: E402,F401  (session fixture)
from tests.s3server import bucket, moto_server, s3  # noqa: E402,F401  (loopback S3 fixtures)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_model() -> object:
    from tests.fixtures.tiny import build_tiny_qwen2

    return build_tiny_qwen2(seed=0)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model: object) -> Path:
    """The tiny Qwen2 saved by transformers as one fp32 model.safetensors."""
    path = tmp_path_factory.mktemp("tiny-hf")
    tiny_model.save_pretrained(path)  # type: ignore[attr-defined]
    return path
