"""Which non-weight files travel with a model, and where to take each from."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ckpt_core.errors import FormatError
from ckpt_core.io.storage import Location

# Config, generation, tokenizer, processor and chat-template files, as transformers saves them.
ASSET_FILES = (
    "config.json",
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
    for asset in assets:
        if asset.name == "config.json":
            root = Location(asset.url)
            try:
                parsed = json.loads(root.read_text("config.json"))
            except json.JSONDecodeError as e:
                raise FormatError(f"{root.file('config.json')}: not valid JSON ({e})") from e
            return parsed if isinstance(parsed, dict) else None
    return None


def tie_word_embeddings(config: dict[str, Any]) -> bool:
    """The config's own word when it says it (the text part's first: VLM configs nest it);
    otherwise ask transformers, whose model classes have different defaults. Importing
    transformers costs a second or more, so it is the fallback."""
    text = config.get("text_config")
    for part in (text if isinstance(text, dict) else {}, config):
        if "tie_word_embeddings" in part:
            return bool(part["tie_word_embeddings"])
    from transformers import AutoConfig

    try:
        parsed = AutoConfig.for_model(**config)
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"config.json: transformers cannot read it ({e})") from e
    text_config = parsed.get_text_config()
    return bool(
        getattr(text_config, "tie_word_embeddings", getattr(parsed, "tie_word_embeddings", False))
    )
