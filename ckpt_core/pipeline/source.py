"""A conversion's source as the pipeline reads it: the format's reader, then the source
transforms, in order, each a Reader over the one before (LoRA fused into its base, prefixes
stripped, a trainer's extra entries left out, names laid out as `save_pretrained` writes them).

`open_source` is the one place that builds it, so the planning process and every worker (a
Prefect task on another machine) read the very same tensors under the very same names.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckpt_core.errors import FormatError
from ckpt_core.formats.protocol import Reader
from ckpt_core.formats.registry import detect, get_format
from ckpt_core.io.storage import Location
from ckpt_core.pipeline import lora, multi_model, prefixes
from ckpt_core.pipeline.assets import AssetSource, allowed_root, find_assets, read_config
from ckpt_core.pipeline.conversion import ConvertOptions
from ckpt_core.pipeline.save_layout import save_layout

__all__ = ["TRANSFORMS", "Source", "Transform", "check_weight_files", "open_source"]


@dataclass(frozen=True)
class Source:
    """What the transforms may use: the format's name, the assets found (config, tokenizer),
    the config as a dict (None without one) and the conversion's options."""

    format: str
    assets: tuple[AssetSource, ...]
    config: dict[str, Any] | None
    options: ConvertOptions


# A transform returns the reader it was given when it has nothing to do.
Transform = Callable[[Reader, Source], Reader]

# In order. Each is a pure function of the reader and the source: applied again by a worker,
# it gives the same reader.
TRANSFORMS: Sequence[Transform] = (
    multi_model.select_models,  # BAGEL main/EMA: the models --models asks for, in the base's form
    lora.lora_transform,
    prefixes.strip_prefixes,
    save_layout,  # last: the names as save_pretrained writes them
)


def open_source(
    read_url: str, options: ConvertOptions, *, format_name: str | None = None
) -> tuple[Reader, Source]:
    """The format's reader (`format_name`, else `options.format`, else detected), the assets
    from the source's own directories then `--base`, and every transform applied."""
    name = format_name or options.format
    fmt = get_format(name) if name else detect(read_url)
    location = Location(read_url)
    reader = fmt.open(location, options.open_options)
    if location.is_local and os.path.isdir(location.path):
        # A file named on the command line is the source itself: only a directory's are checked.
        check_weight_files(reader)
    dirs = list(reader.asset_dirs())
    if options.base:
        dirs.append(Location(options.base))
    assets = tuple(find_assets(dirs))
    source = Source(fmt.name, assets, read_config(assets), options)
    for transform in TRANSFORMS:
        reader = transform(reader, source)
    return reader, source


def check_weight_files(reader: Reader) -> None:
    """Every weight file of a local source directory resolves inside it (or inside its hub-cache
    repo, whose snapshots link into `blobs/`: the rule assets follow): a link to weights
    elsewhere, or to any other file, is never read as this model."""
    root = reader.root
    if not root.is_local:
        return
    allowed = allowed_root(Path(os.path.realpath(root.path)))
    for name in reader.facts().files:
        target = Path(os.path.realpath(root.file(name)))
        if not target.is_relative_to(allowed):
            raise FormatError(
                f"{root.file(name)}: a weight file that leads to {target}, outside {allowed}; "
                "ckptflow reads a source's weights only from the directory it was given: copy "
                "the file in (if it is meant to be there) or convert the directory that holds it"
            )
