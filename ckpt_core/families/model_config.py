"""The model a config describes: reading config.json, and the tied-`lm_head` rule.

One copy of each rule: every reader, the split, the merge and the convert pipeline ask here
whether the embeddings are tied and what follows from it.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any

from ckpt_core.errors import ConfigError, FormatError, KeyMismatchError
from ckpt_core.io.storage import Location

__all__ = [
    "CONFIG",
    "TIED_HEAD",
    "head_to_drop",
    "load_config",
    "read_config",
    "tie_word_embeddings",
    "transformers_config",
]

CONFIG = "config.json"
TIED_HEAD = "lm_head.weight"


def read_config(root: Location, name: str = CONFIG) -> dict[str, Any] | None:
    """A directory's config.json as a dict; None when it has none."""
    if not root.exists(name):
        return None
    try:
        parsed = json.loads(root.read_text(name))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{root.file(name)}: not valid JSON ({e})") from e
    if not isinstance(parsed, dict):
        raise FormatError(f"{root.file(name)}: not a JSON object")
    return parsed


def load_config(root: Location, where: str | None = None) -> dict[str, Any]:
    """As `read_config`, for callers that cannot go on without one."""
    config = read_config(root)
    if config is None:
        raise ConfigError(
            f"{where or root.file(CONFIG)}: no config.json (pass the base model directory)"
        )
    return config


def transformers_config(values: Mapping[str, Any], where: str) -> Any:
    """The config as the installed transformers reads it (its defaults filled in)."""
    from transformers import AutoConfig

    fields = dict(values)
    model_type = fields.pop("model_type", None)
    if not model_type:
        raise ConfigError(
            f"{where}: not a transformers config.json (no model_type); pass --base with the HF "
            "model directory the checkpoint was trained from"
        )
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{where}: transformers cannot read it ({e})") from e


def tie_word_embeddings(config: Mapping[str, Any], where: str = CONFIG) -> bool:
    """The config's own word when it says it (the text part's first: VLM configs nest it);
    otherwise ask transformers, whose model classes have different defaults. Importing
    transformers costs a second or more, so it is the fallback."""
    text = config.get("text_config")
    for part in (text if isinstance(text, Mapping) else {}, config):
        if "tie_word_embeddings" in part:
            return bool(part["tie_word_embeddings"])
    parsed = transformers_config(config, where)
    text_config = parsed.get_text_config()
    return bool(
        getattr(text_config, "tie_word_embeddings", getattr(parsed, "tie_word_embeddings", False))
    )


def head_to_drop(
    names: Collection[str], *, tied: bool, where: str, head: str = TIED_HEAD
) -> str | None:
    """transformers does not save a tied output head, so a present one is left out (returned);
    an untied model must have one, or the output would load with a random head."""
    if tied:
        return head if head in names else None
    if head not in names and any(n.endswith("embed_tokens.weight") for n in names):
        raise KeyMismatchError(
            f"{where}: the config says tie_word_embeddings=false but the checkpoint has no "
            f"{head}; the output would load with a random head"
        )
    return None
