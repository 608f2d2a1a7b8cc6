"""Strict key check of a checkpoint against the model its config describes.

The model is built on the meta device (no memory, no weights), so its state dict names are
exactly what `from_pretrained` will look for. Missing keys fail unless they are tied to a key
that is present (same parameter object, e.g. lm_head.weight <- embed_tokens.weight) or match
an `allow_missing` fnmatch pattern; unexpected keys always fail.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase
from typing import Any

from ckpt_core.errors import ConfigError, KeyMismatchError, clip
from ckpt_core.families.hf_layout import build_meta_model
from ckpt_core.families.model_config import CONFIG, read_config, transformers_config
from ckpt_core.io.storage import Location, split_url

__all__ = ["check_keys", "model_config_at", "model_key_groups", "tied_duplicates"]


def model_config_at(config_dir_or_url: str) -> Any:
    """A transformers config from `config.json` in a directory (or the json file itself), any URL."""
    loc = Location(config_dir_or_url)
    directory, name = (loc, CONFIG) if loc.isdir() else _file(config_dir_or_url)
    values = read_config(directory, name)
    if values is None:
        raise ConfigError(
            f"{directory.file(name)}: no config.json to check the checkpoint's keys against"
        )
    return transformers_config(values, directory.file(name))


def _file(url: str) -> tuple[Location, str]:
    parent, name = split_url(url)
    return Location(parent), name


def model_key_groups(config: Any) -> list[list[str]]:
    """The model's state dict names, grouped by shared tensor (tied names together), in order."""
    model = build_meta_model(config)
    groups: dict[int, list[str]] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(value), []).append(name)
    return list(groups.values())


def check_keys(
    names: Iterable[str],
    config_dir_or_url: str,
    allow_missing_patterns: Sequence[str] = (),
    where: str = "checkpoint",
) -> list[str]:
    """Raise KeyMismatchError unless `names` are the model's keys; return tied names to drop.

    A tied group (names sharing one tensor) is satisfied by any one of its names; the other
    names present in the checkpoint are returned so the caller drops them (transformers saves a
    tied group once). Checking that the dropped copies equal the kept one is the caller's job
    (`tied_duplicates` says which name each dropped one duplicates).
    """
    return list(tied_duplicates(names, config_dir_or_url, allow_missing_patterns, where))


def tied_duplicates(
    names: Iterable[str],
    config_dir_or_url: str,
    allow_missing_patterns: Sequence[str] = (),
    where: str = "checkpoint",
) -> dict[str, str]:
    """As `check_keys`, returning {tied name to drop: the name kept for its group}."""
    have = set(names)
    groups = model_key_groups(model_config_at(config_dir_or_url))
    expected = {n for g in groups for n in g}
    missing: list[str] = []
    drop: dict[str, str] = {}
    for group in groups:
        found = [n for n in group if n in have]
        if not found:
            missing.extend(
                n for n in group if not any(fnmatchcase(n, p) for p in allow_missing_patterns)
            )
            continue
        drop.update({alias: found[0] for alias in found[1:]})
    unexpected = sorted(have - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {clip(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {clip(unexpected)}")
        raise KeyMismatchError(
            f"{where}: keys do not match the model in {config_dir_or_url} ({'; '.join(parts)}); "
            "check --base, or pass --allow-missing PATTERN for keys that are meant to be absent"
        )
    return drop
