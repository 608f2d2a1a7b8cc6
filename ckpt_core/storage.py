"""All IO goes through fsspec: a location is a URL (local path, file://, memory://, s3://)."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from ckpt_core.errors import FormatError


@dataclass(frozen=True)
class Location:
    """A directory or file addressed by URL; `fs` and `path` are what fsspec resolves it to."""

    url: str

    @cached_property
    def _resolved(self) -> tuple[fsspec.AbstractFileSystem, str]:
        fs, path = url_to_fs(self.url)
        return fs, path.rstrip("/") or "/"

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self._resolved[0]

    @property
    def path(self) -> str:
        return self._resolved[1]

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def child(self, relative: str) -> Location:
        return Location(join_url(self.url, relative))

    def file(self, relative: str) -> str:
        """fsspec path of a file below this directory."""
        return posixpath.join(self.path, relative)

    def exists(self, relative: str = "") -> bool:
        return bool(self.fs.exists(self.file(relative) if relative else self.path))

    def isdir(self, relative: str = "") -> bool:
        return bool(self.fs.isdir(self.file(relative) if relative else self.path))

    def listdir(self) -> list[str]:
        """Names directly below this directory (files and folders)."""
        if not self.fs.isdir(self.path):
            return []
        return sorted(
            posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.path, detail=False)
        )

    def size(self, relative: str) -> int:
        return int(self.fs.size(self.file(relative)))

    def info(self, relative: str) -> dict[str, Any]:
        return dict(self.fs.info(self.file(relative)))

    def read_bytes(self, relative: str, start: int | None = None, end: int | None = None) -> bytes:
        """One ranged read: a GET with a Range header on object stores, seek+read locally."""
        return bytes(self.fs.cat_file(self.file(relative), start=start, end=end))

    def read_into(self, relative: str, start: int, buffer: memoryview) -> None:
        """Fill `buffer` from byte `start` of a file: one copy, no intermediate bytes object."""
        with self.fs.open(self.file(relative), "rb") as handle:
            handle.seek(start)
            view = buffer.cast("B")
            filled = 0
            while filled < len(view):
                count = handle.readinto(view[filled:])
                if not count:
                    raise FormatError(
                        f"{self.file(relative)}: file ends at byte {start + filled}, "
                        f"expected {len(view) - filled} more bytes (truncated?)"
                    )
                filled += count

    def read_text(self, relative: str) -> str:
        return self.read_bytes(relative).decode("utf-8")


def join_url(url: str, relative: str) -> str:
    return url.rstrip("/") + "/" + relative.lstrip("/")


def safe_relative(name: str, where: str) -> str:
    """A file name from inside a checkpoint (an index json, a manifest) must stay inside it."""
    normal = posixpath.normpath(name)
    if name.startswith("/") or normal.startswith("..") or "\\" in name or normal == ".":
        raise FormatError(f"{where}: file name {name!r} points outside the checkpoint directory")
    return normal
