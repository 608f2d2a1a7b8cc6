"""All IO goes through fsspec: a location is a URL (local path, file://, memory://, s3://).

Object stores: s3fs takes the endpoint and credentials from the standard AWS environment
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, ...) or from
`configure("s3", endpoint_url=..., key=..., secret=...)`; neither is ever logged or recorded.
Every call is retried on transient errors (ckpt_core.io.retry); reads are byte ranges.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.core import split_protocol, url_to_fs
from fsspec.implementations.local import LocalFileSystem

from ckpt_core.errors import FormatError
from ckpt_core.io import retry

__all__ = [
    "Location",
    "PART_SUFFIX",
    "REMOTE_CHUNK_BYTES",
    "WRITE_BLOCK_BYTES",
    "configure",
    "inside",
    "join_url",
    "options_for",
    "safe_relative",
    "split_url",
]

WRITE_BLOCK_BYTES = 16 * 2**20
PART_SUFFIX = ".ckptflow-part"  # a local file being written; renamed to its name when complete
REMOTE_CHUNK_BYTES = 32 * 2**20  # one ranged GET per chunk when filling a buffer from a store
_OPTIONS: dict[str, dict[str, Any]] = {}


def configure(protocol: str, **options: Any) -> None:
    """Storage options for every later Location of `protocol` (e.g. "s3": endpoint_url, key,
    secret, client_kwargs). Kept in memory only: never logged, never in a manifest or a plan."""
    _OPTIONS[protocol] = dict(options)
    if protocol == "s3":
        with contextlib.suppress(ImportError):
            from s3fs import S3FileSystem

            S3FileSystem.clear_instance_cache()


# Other processes write the same prefixes (a resumed or a concurrent run): never answer
# exists/info/ls from a listing cached earlier in this process.
_DEFAULTS: dict[str, dict[str, Any]] = {"s3": {"use_listings_cache": False}}


def options_for(url: str) -> dict[str, Any]:
    protocol = split_protocol(url)[0] or "file"
    return {**_DEFAULTS.get(protocol, {}), **_OPTIONS.get(protocol, {})}


@dataclass(frozen=True)
class Location:
    """A directory or file addressed by URL; `fs` and `path` are what fsspec resolves it to."""

    url: str

    @cached_property
    def _resolved(self) -> tuple[fsspec.AbstractFileSystem, str]:
        fs, path = url_to_fs(self.url, **options_for(self.url))
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

    def _where(self, relative: str) -> str:
        return self.file(relative) if relative else self.path

    def exists(self, relative: str = "") -> bool:
        where = self._where(relative)
        return bool(retry.call(where, lambda: self.fs.exists(where)))

    def isdir(self, relative: str = "") -> bool:
        where = self._where(relative)
        return bool(retry.call(where, lambda: self.fs.isdir(where)))

    def listdir(self) -> list[str]:
        """Names directly below this directory (files and folders)."""
        if not self.isdir():
            return []
        listing = retry.call(self.path, lambda: self.fs.ls(self.path, detail=False, refresh=True))
        return sorted(posixpath.basename(p.rstrip("/")) for p in listing)

    def size(self, relative: str) -> int:
        return int(self.info(relative)["size"])

    def info(self, relative: str) -> dict[str, Any]:
        where = self.file(relative)
        return dict(retry.call(where, lambda: self.fs.info(where)))

    def read_bytes(self, relative: str, start: int | None = None, end: int | None = None) -> bytes:
        """One ranged read: a GET with a Range header on object stores, seek+read locally."""
        where = self.file(relative)
        return bytes(retry.call(where, lambda: self.fs.cat_file(where, start=start, end=end)))

    def read_into(self, relative: str, start: int, buffer: memoryview) -> None:
        """Fill `buffer` from byte `start` of a file: locally one copy straight into the buffer;
        on a store one ranged GET per chunk (never the whole object, never a read-ahead cache)."""
        view = buffer.cast("B")
        where = self.file(relative)
        if self.is_local:
            retry.call(where, lambda: self._readinto_local(where, start, view))
            return
        for offset in range(0, len(view), REMOTE_CHUNK_BYTES):
            piece = view[offset : offset + REMOTE_CHUNK_BYTES]
            begin = start + offset
            data = self.read_bytes(relative, begin, begin + len(piece))
            if len(data) != len(piece):
                raise FormatError(
                    f"{where}: file ends at byte {begin + len(data)}, expected "
                    f"{len(view) - offset - len(data)} more bytes (truncated?)"
                )
            piece[:] = data

    def _readinto_local(self, where: str, start: int, view: memoryview) -> None:
        with self.fs.open(where, "rb") as handle:
            handle.seek(start)
            filled = 0
            while filled < len(view):
                count = handle.readinto(view[filled:])
                if not count:
                    raise FormatError(
                        f"{where}: file ends at byte {start + filled}, "
                        f"expected {len(view) - filled} more bytes (truncated?)"
                    )
                filled += count

    def read_text(self, relative: str) -> str:
        return self.read_bytes(relative).decode("utf-8")

    @contextlib.contextmanager
    def writing(self, relative: str) -> Iterator[IO[bytes]]:
        """A file appears whole or not at all: locally it is written under a temporary name
        and renamed; on an object store the object appears when its upload completes, and a
        failed upload is aborted rather than committed half-written. No fsync: a killed
        process loses nothing the page cache holds, and after a power loss a resumed run
        re-hashes every kept shard against its record anyway (fsync cost 2x on this path)."""
        where = self.file(relative)
        if self.is_local:
            os.makedirs(os.path.dirname(where) or ".", exist_ok=True)
            temporary = where + PART_SUFFIX
            try:
                with open(temporary, "wb") as handle:
                    yield handle
                os.replace(temporary, where)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(temporary)
                raise
            return
        # Upload parts of 16 MiB (s3fs buffers a whole 50 MB part per open file by default).
        handle = self.fs.open(where, "wb", block_size=WRITE_BLOCK_BYTES)
        try:
            yield handle
        except BaseException:
            discard = getattr(handle, "discard", None)
            if callable(discard):
                discard()  # s3fs: abort the multipart upload; nothing appears
            else:
                handle.close()
            raise
        handle.close()

    def put_bytes(self, relative: str, data: bytes, create_only: bool = False) -> None:
        """Write a small file whole. `create_only`: fail with FileExistsError if it exists
        (O_EXCL locally, a conditional PUT with If-None-Match on S3)."""
        where = self.file(relative)
        if self.is_local and create_only:
            os.makedirs(os.path.dirname(where) or ".", exist_ok=True)
            fd = os.open(where, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            return
        if self.is_local:
            with self.writing(relative) as handle:
                handle.write(data)
            return
        mode = "create" if create_only else "overwrite"
        retry.call(where, lambda: self.fs.pipe_file(where, data, mode=mode))

    def remove(self, relative: str = "", recursive: bool = False) -> None:
        """Delete a file (or a tree); a missing one is fine."""
        where = self._where(relative)

        def rm() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(where, recursive=recursive)

        retry.call(where, rm)


def join_url(url: str, relative: str) -> str:
    return url.rstrip("/") + "/" + relative.lstrip("/")


def split_url(url: str) -> tuple[str, str]:
    """(parent, last name) of a path or URL; a bucket (`s3://b`) is its own parent, named ""."""
    stripped = url.rstrip("/")
    parent, _, name = stripped.rpartition("/")
    if parent.endswith(":/"):
        return stripped, ""
    return parent or ("/" if stripped.startswith("/") else "."), name


def safe_relative(name: str, where: str) -> str:
    """A file name from inside a checkpoint (an index json, a manifest) must stay inside it."""
    normal = posixpath.normpath(name)
    if name.startswith("/") or normal.startswith("..") or "\\" in name or normal == ".":
        raise FormatError(f"{where}: file name {name!r} points outside the checkpoint directory")
    return normal


def inside(root: Path, relative: str, *, where: str = "") -> Path:
    """`root / relative` for a name from a listing or a remote key, which must stay below `root`:
    no absolute name, no `..` part, no backslash, and no symlink under `root` leading out."""
    parts = relative.split("/")
    if (
        not relative
        or relative.startswith("/")
        or "\\" in relative
        or "\0" in relative
        or any(p in ("..", ".") for p in parts)
    ):
        raise FormatError(
            f"{where or root}: name {relative!r} would land outside {root}; refusing it "
            "(remove or rename that object)"
        )
    base = Path(os.path.realpath(root))
    local = base.joinpath(*[p for p in parts if p])
    if not Path(os.path.realpath(local)).is_relative_to(base):
        raise FormatError(f"{where or root}: {relative!r} leads outside {root} through a symlink")
    return local
