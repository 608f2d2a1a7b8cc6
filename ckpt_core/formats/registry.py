"""The format table: every format ckptflow reads, by name, in detection order. A new format is
one module with a `FORMAT` and one line here; nothing else names formats."""

from __future__ import annotations

from collections.abc import Iterable
from types import MappingProxyType

from ckpt_core.errors import FormatError
from ckpt_core.formats import (
    bagel,
    dcp,
    deepspeed,
    fsdp_ranks,
    hf,
    megatron,
    peft_adapter,
    torch_file,
    tp_ranks,
)
from ckpt_core.formats.protocol import Format, OpenOptions, Reader
from ckpt_core.io.storage import Location

__all__ = ["FORMATS", "detect", "formats", "get_format", "open_reader", "table"]


def table(entries: Iterable[Format]) -> MappingProxyType[str, Format]:
    """Name -> format, in the given order; a name given twice is a programming error."""
    built: dict[str, Format] = {}
    for fmt in entries:
        if fmt.name in built:
            raise ValueError(f"format name {fmt.name!r} is registered twice")
        built[fmt.name] = fmt
    return MappingProxyType(built)


# Specific layouts first: a DeepSpeed or rank-file directory also holds torch.save files, and
# `torch-file` accepts any single one of them. A BAGEL step directory holds DCP folders and
# rank files of two models: before `dcp` and `fsdp-ranks`.
FORMATS = table(
    (
        deepspeed.FORMAT,
        bagel.FORMAT,
        megatron.FORMAT,  # a torch_dist dir is DCP plus metadata.json: before dcp
        dcp.FORMAT,
        tp_ranks.FORMAT,
        fsdp_ranks.FORMAT,
        peft_adapter.FORMAT,
        hf.FORMAT,
        torch_file.FORMAT,
    )
)


def formats() -> list[Format]:
    return list(FORMATS.values())


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise FormatError(
            f"unknown format {name!r}: known formats are {', '.join(FORMATS)}"
        ) from None


def detect(url: str) -> Format:
    root = Location(url)
    if not root.exists():
        raise FormatError(f"{url}: no such file or directory")
    for fmt in FORMATS.values():
        if fmt.detect(root):
            return fmt
    listing = ", ".join(root.listdir()[:12]) or "(empty)"
    raise FormatError(
        f"{url}: not a checkpoint ckptflow can read (found: {listing}); "
        f"known formats: {', '.join(FORMATS)}"
    )


def open_reader(
    url: str, options: OpenOptions | None = None, format_name: str | None = None
) -> Reader:
    fmt = get_format(format_name) if format_name else detect(url)
    return fmt.open(Location(url), options or OpenOptions())
