"""Format registry: each format module registers itself; nothing else names formats."""

from __future__ import annotations

import importlib
import pkgutil

from ckpt_core.errors import FormatError
from ckpt_core.reader import Format, OpenOptions, Reader
from ckpt_core.storage import Location

_FORMATS: dict[str, Format] = {}
_BUILTINS_LOADED = False  # not `not _FORMATS`: importing one format module directly registers it


def register(fmt: Format) -> Format:
    _FORMATS[fmt.name] = fmt
    return fmt


def _load_builtin_formats() -> None:
    import ckpt_core.formats as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")


def formats() -> list[Format]:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _load_builtin_formats()
        _BUILTINS_LOADED = True
    return sorted(_FORMATS.values(), key=lambda f: (f.priority, f.name))


def get_format(name: str) -> Format:
    for fmt in formats():
        if fmt.name == name:
            return fmt
    raise FormatError(
        f"unknown format {name!r}: known formats are {', '.join(f.name for f in formats())}"
    )


def detect(url: str) -> Format:
    root = Location(url)
    if not root.exists():
        raise FormatError(f"{url}: no such file or directory")
    for fmt in formats():
        if fmt.detect(root):
            return fmt
    listing = ", ".join(root.listdir()[:12]) or "(empty)"
    raise FormatError(
        f"{url}: not a checkpoint ckptflow can read (found: {listing}); "
        f"known formats: {', '.join(f.name for f in formats())}"
    )


def open_reader(
    url: str, options: OpenOptions | None = None, format_name: str | None = None
) -> Reader:
    fmt = get_format(format_name) if format_name else detect(url)
    return fmt.open(Location(url), options or OpenOptions())
