"""A model's config.json: read as a dict, and as the installed transformers reads it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ckpt_core.errors import ConfigError, FormatError
from ckpt_core.io.storage import Location

__all__ = [
    "CONFIG",
    "TIED_HEAD",
    "load_config",
    "read_config",
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
