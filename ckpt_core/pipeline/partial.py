"""Partial outputs, said plainly: `--exclude-frozen` leaves parameters out, so its output is a
checkpoint of the trained part, not a model `from_pretrained` can load on its own. The names
left out are what a full read of the same source holds beyond this one; the report's verdict
and the manifest say so (`"partial": true`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from ckpt_core.pipeline.conversion import ConvertOptions
from ckpt_core.pipeline.source import open_source

__all__ = ["left_out_names"]


def left_out_names(
    read_url: str, options: ConvertOptions, format_name: str, kept: Iterable[str]
) -> tuple[str, ...]:
    """The tensors `--exclude-frozen` left out of this source (none without the flag, or when
    the source has no frozen parameters), by opening it once more without the flag."""
    if not options.open_options.exclude_frozen:
        return ()
    full_options = replace(
        options, open_options=replace(options.open_options, exclude_frozen=False)
    )
    full, _ = open_source(read_url, full_options, format_name=format_name)
    return tuple(sorted(set(full.index()) - set(kept)))
