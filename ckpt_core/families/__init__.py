"""Model families: per-architecture rules (key prefixes, parts, TP roles), declared as data.

One module per family, each with a `FAMILY`, listed in the table below.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ckpt_core.errors import FormatError
from ckpt_core.families import qwen2_5_vl
from ckpt_core.families.family import Family, Part, Prefix
from ckpt_core.families.model_config import load_config

__all__ = ["FAMILIES", "Family", "Part", "Prefix", "family_for", "load_config"]

FAMILIES: dict[str, Family] = {f.model_type: f for f in (qwen2_5_vl.FAMILY,)}


def family_for(config: Mapping[str, Any], where: str) -> Family:
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise FormatError(
            f"{where}: model_type {model_type!r} has no split/merge rules; known families: "
            f"{', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[str(model_type)]
