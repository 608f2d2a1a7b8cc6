"""Wrapper prefixes stripped from tensor names: DDP's `module.`, `torch.compile`'s `_orig_mod.`.

A source transform. With `--strip-prefix P` (any number) those prefixes are stripped wherever
a name starts with them. Without it, the known wrapper prefixes are stripped only when a config
says what the model's names are and every name, stripped, is one of them; otherwise names are
left alone and the key check against the model reports them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from ckpt_core.errors import FormatError, clip
from ckpt_core.families.hf_layout import model_key_groups
from ckpt_core.families.model_config import transformers_config
from ckpt_core.formats.protocol import Reader, SourceFacts, TensorInfo, lookup
from ckpt_core.io.storage import Location

if TYPE_CHECKING:  # source.py lists this transform: only the type is needed here
    from ckpt_core.pipeline.source import Source

__all__ = ["WRAPPER_PREFIXES", "RenamedReader", "strip_prefixes", "stripped"]

# What DDP (`module.`) and torch.compile (`_orig_mod.`) put before every name, in any nesting.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def stripped(name: str, prefixes: Sequence[str]) -> str:
    """`name` without any of `prefixes` at its start, again and again (DDP around compile)."""
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if prefix and name.startswith(prefix) and len(name) > len(prefix):
                name, changed = name[len(prefix) :], True
    return name


class RenamedReader:
    """Another reader's tensors under new names; reads pass straight through."""

    def __init__(self, inner: Reader, renames: Mapping[str, str], note: str) -> None:
        self.root: Location = inner.root
        self._inner = inner
        self._source = {new: old for old, new in renames.items()}
        self._note = note
        index = inner.index()
        self._index = {
            renames[old]: TensorInfo(renames[old], info.dtype, info.shape)
            for old, info in index.items()
        }

    def index(self) -> Mapping[str, TensorInfo]:
        return self._index

    def read(self, name: str) -> torch.Tensor:
        return self._inner.read(lookup(self._source, name, self.root.url))

    def read_range(
        self, name: str, start: int, count: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        old = lookup(self._source, name, self.root.url)
        read_range = getattr(self._inner, "read_range", None)
        if read_range is None:  # the inner reader reads whole tensors only
            flat = self._inner.read(old).reshape(-1)[start : start + count]
            return flat if out is None else out.copy_(flat)
        result: torch.Tensor = read_range(old, start, count, out)
        return result

    def facts(self) -> SourceFacts:
        facts = self._inner.facts()
        return SourceFacts(facts.format, list(facts.files), [*facts.notes, self._note])

    def asset_dirs(self) -> list[Location]:
        return self._inner.asset_dirs()

    def __getattr__(self, attribute: str) -> object:
        # Anything else a format offers (its own attributes) is the inner reader's.
        return getattr(self._inner, attribute)


def strip_prefixes(reader: Reader, source: Source) -> Reader:
    """The transform: `--strip-prefix` as asked, else wrapper prefixes when that makes every
    name one of the model's."""
    names = list(reader.index())
    asked = tuple(source.options.strip_prefix)
    if asked:
        renames = {n: stripped(n, asked) for n in names}
        how = f"stripped the prefixes {', '.join(map(repr, asked))} (--strip-prefix)"
        return _renamed(reader, renames, how)
    if source.config is None or not any(n.startswith(WRAPPER_PREFIXES) for n in names):
        return reader
    config = transformers_config(source.config, "config.json")
    expected = {n for group in model_key_groups(config) for n in group}
    if set(names) <= expected:
        return reader
    renames = {n: stripped(n, WRAPPER_PREFIXES) for n in names}
    if not set(renames.values()) <= expected:
        return reader  # not (only) a wrapper's names: the key check says what differs
    found = sorted({old[: len(old) - len(new)] for old, new in renames.items() if old != new})
    how = (
        f"stripped the wrapper prefix {', '.join(map(repr, found))} (DDP `module.`, "
        "torch.compile `_orig_mod.`): with them removed every name is one of the model's"
    )
    return _renamed(reader, renames, how)


def _renamed(reader: Reader, renames: dict[str, str], how: str) -> Reader:
    changed = sum(1 for old, new in renames.items() if old != new)
    if not changed:
        return reader
    owners: dict[str, str] = {}
    for old, new in renames.items():
        if new in owners:
            raise FormatError(
                f"{reader.root.url}: {owners[new]!r} and {old!r} both become {new!r} once the "
                "prefixes are stripped; strip fewer prefixes (--strip-prefix)"
            )
        owners[new] = old
    examples = clip([f"{o} -> {n}" for o, n in renames.items() if o != n], 2)
    return RenamedReader(reader, renames, f"{how}; {changed} names, e.g. {examples}")
