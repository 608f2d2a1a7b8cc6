"""The DeepSpeed fixtures' paths and their truth (zero_to_fp32's reconstruction), shared by the
DeepSpeed and partial-output tests."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from tests.fixtures.deepspeed_cache import deepspeed_fixtures

FROZEN = "model.norm.weight"  # the parameter the fixtures' runs freeze


@pytest.fixture(scope="session")
def ds_root() -> Path:
    return deepspeed_fixtures()


def ckpt(root: Path, case: str) -> str:
    return str(root / case / "ckpt")


@functools.cache
def reference(path: str, exclude_frozen: bool = False) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(
        get_fp32_state_dict_from_zero_checkpoint(path, exclude_frozen_parameters=exclude_frozen)
    )
