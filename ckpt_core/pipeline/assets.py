"""Which non-weight files travel with a model, and where to take each from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ckpt_core.families import model_config
from ckpt_core.families.model_config import CONFIG
from ckpt_core.io.storage import Location

__all__ = ["ASSET_FILES", "AssetSource", "find_assets", "read_config"]

# Config, generation, tokenizer, processor and chat-template files, as transformers saves them.
ASSET_FILES = (
    CONFIG,
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "llm_config.json",
    "vit_config.json",
)
# Weight files and indexes are never assets: a stale one beside new weights shadows them.


@dataclass(frozen=True)
class AssetSource:
    name: str
    url: str  # the directory holding it


def find_assets(dirs: Sequence[Location]) -> list[AssetSource]:
    """Each asset from the first directory that has it (the source's own, then --base)."""
    found: dict[str, AssetSource] = {}
    for directory in dirs:
        present = set(directory.listdir()) if directory.isdir() else set()
        for name in ASSET_FILES:
            if name in present and name not in found:
                found[name] = AssetSource(name, directory.url)
    return [found[name] for name in ASSET_FILES if name in found]


def read_config(assets: Sequence[AssetSource]) -> dict[str, Any] | None:
    """The config.json among the assets, as a dict (None when there is none)."""
    for asset in assets:
        if asset.name == CONFIG:
            return model_config.read_config(Location(asset.url))
    return None
