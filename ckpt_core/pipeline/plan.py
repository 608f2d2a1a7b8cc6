"""Pure shard planning: names and byte sizes in, file names out (no IO, plain ints in tests)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from huggingface_hub import split_state_dict_into_shards_factory

from ckpt_core.formats.hf import SAFETENSORS_INDEX

__all__ = [
    "SAFETENSORS_INDEX",
    "SAFETENSORS_PATTERN",
    "ShardSpec",
    "index_json",
    "index_jsons",
    "plan_shards",
]

SAFETENSORS_PATTERN = "model{suffix}.safetensors"


@dataclass(frozen=True)
class ShardSpec:
    filename: str
    tensors: tuple[str, ...]  # output names, in file order
    nbytes: int
    # Several models in one output (BAGEL main/EMA): the reader's name is source_prefix + name,
    # and each model's shards have their own index file.
    source_prefix: str = ""
    index_name: str = SAFETENSORS_INDEX


def plan_shards(
    names: Sequence[str],
    size_of: Callable[[str], int],
    max_shard_bytes: int,
    filename_pattern: str = SAFETENSORS_PATTERN,
) -> list[ShardSpec]:
    """huggingface_hub's own splitter (greedy in key order, oversize tensors alone), sizes injected."""
    # Values are 1-tuples: the splitter skips plain strings (its bnb special case).
    split = split_state_dict_into_shards_factory(
        {name: (name,) for name in names},
        get_storage_size=lambda key: size_of(key[0]),
        filename_pattern=filename_pattern,
        max_shard_size=max_shard_bytes,
    )
    return [
        ShardSpec(filename, tuple(tensors), sum(size_of(t) for t in tensors))
        for filename, tensors in split.filename_to_tensors.items()
    ]


def index_json(shards: Sequence[ShardSpec]) -> dict[str, object] | None:
    """The HF index for a sharded output; None when one file holds everything."""
    if len(shards) <= 1:
        return None
    return {
        "metadata": {"total_size": sum(s.nbytes for s in shards)},
        "weight_map": {name: shard.filename for shard in shards for name in sorted(shard.tensors)},
    }


def index_jsons(shards: Sequence[ShardSpec]) -> dict[str, dict[str, object]]:
    """Index file name -> its content, one per group of shards sharing an index (a model)."""
    groups: dict[str, list[ShardSpec]] = {}
    for shard in shards:
        groups.setdefault(shard.index_name, []).append(shard)
    found = {name: index_json(group) for name, group in groups.items()}
    return {name: index for name, index in found.items() if index is not None}
