from __future__ import annotations

import pytest

from ckpt_core.errors import CkptError
from ckpt_core.pipeline.plan import index_json, plan_shards
from ckpt_core.units import parse_size_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5GB", 5 * 10**9),
        ("500MB", 5 * 10**8),
        ("200KB", 200_000),
        ("1234", 1234),
        ("1GiB", 2**30),
        ("1.5GB", 1_500_000_000),
        (7, 7),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "5 parsecs", "-1", "0", "GB"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(CkptError):
        parse_size_bytes(text)


def test_plan_greedy_in_order_with_oversize_alone() -> None:
    sizes = {"a": 40, "b": 40, "c": 40, "big": 500, "d": 10}
    shards = plan_shards(list(sizes), sizes.__getitem__, max_shard_bytes=100)
    # huggingface_hub's order: an oversize tensor's shard is emitted as soon as it is met.
    assert [s.tensors for s in shards] == [("a", "b"), ("big",), ("c", "d")]
    assert [s.filename for s in shards] == [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    assert sum(s.nbytes for s in shards) == sum(sizes.values())
    index = index_json(shards)
    assert index is not None
    assert index["metadata"] == {"total_size": 630}
    assert set(index["weight_map"]) == set(sizes)  # type: ignore[arg-type]


def test_plan_single_shard_has_no_index() -> None:
    shards = plan_shards(["a", "b"], lambda _: 10, max_shard_bytes=100)
    assert [s.filename for s in shards] == ["model.safetensors"]
    assert index_json(shards) is None


def test_the_dtype_literal_names_exactly_the_accepted_dtypes() -> None:
    from typing import get_args

    from ckpt_core.dtypes import TARGET_DTYPES, TargetDtype

    assert set(get_args(TargetDtype)) == set(TARGET_DTYPES)
