"""Which non-weight files travel with a model, and where to take each from."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckpt_core.errors import FormatError
from ckpt_core.families import model_config
from ckpt_core.families.model_config import CONFIG
from ckpt_core.io.storage import Location
from ckpt_core.pipeline.writer import FileRecord, HashingWriter

__all__ = [
    "ASSET_FILES",
    "AssetSource",
    "allowed_root",
    "check_asset",
    "copy_asset",
    "find_assets",
    "read_asset",
    "read_config",
]

_COPY_CHUNK_BYTES = 8 * 2**20

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
                check_asset(directory, name)
                found[name] = AssetSource(name, directory.url)
    return [found[name] for name in ASSET_FILES if name in found]


def read_config(assets: Sequence[AssetSource]) -> dict[str, Any] | None:
    """The config.json among the assets, as a dict (None when there is none)."""
    for asset in assets:
        if asset.name == CONFIG:
            return model_config.read_config(Location(asset.url))
    return None


def read_asset(asset: AssetSource) -> bytes:
    """The asset's bytes, its link checked again right before the read."""
    directory = Location(asset.url)
    check_asset(directory, asset.name)
    return directory.read_bytes(asset.name)


def copy_asset(work: Location, asset: AssetSource) -> FileRecord:
    """Copy an asset into `work` in bounded chunks, hashed as written (a VAE is ~300 MB)."""
    directory = Location(asset.url)
    check_asset(directory, asset.name)
    size = directory.size(asset.name)
    with work.writing(asset.name) as handle:
        out = HashingWriter(handle)
        for start in range(0, size, _COPY_CHUNK_BYTES):
            end = min(size, start + _COPY_CHUNK_BYTES)
            out.write(directory.read_bytes(asset.name, start, end))
    return FileRecord(asset.name, out.size_bytes, out.sha256)


def check_asset(directory: Location, name: str) -> None:
    """An asset that is a symlink must lead to a file inside the directory it was found in (or,
    in a hub cache, inside its `models--*` repo, whose snapshots link into `blobs/`): a link to
    ~/.aws/credentials must never be read, nor copied into a model others download."""
    if not directory.is_local:
        return
    path = Path(directory.file(name))
    if not path.is_symlink():
        return
    allowed = allowed_root(Path(os.path.realpath(directory.path)))
    target = Path(os.path.realpath(path))
    if not target.is_relative_to(allowed):
        raise FormatError(
            f"{path}: a symlink to {target}, outside {allowed}; ckptflow reads assets only from "
            "the directory it was given: copy the file in (if it is meant to be there) or "
            "remove the link"
        )


def allowed_root(directory: Path) -> Path:
    """Where a link in `directory` may lead (assets and weight files alike): the nearest
    enclosing hub-cache repo (`models--org--name`), else the directory itself."""
    for parent in (directory, *directory.parents):
        if parent.name.startswith("models--"):
            return parent
    return directory
