"""`--cache-dir`: stage a remote source on local disk once, then read it from there.

Without it, remote sources are read by byte ranges and nothing is downloaded whole. With it,
the whole source directory is copied to `CACHE_DIR/<hash of the URL>/` and reused while the
remote listing (names, sizes, ETags or modification stamps) is unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import posixpath
import shutil
from pathlib import Path

from ckpt_core.errors import FormatError
from ckpt_core.io import retry
from ckpt_core.io.fingerprint import fingerprint
from ckpt_core.io.storage import Location, inside

__all__ = ["STAMP", "remote_stamp", "stage_source"]

STAMP = ".ckptflow-staged"  # written last: a staging without it is incomplete


def remote_stamp(src_url: str) -> str:
    """What the remote directory holds, by listing only: names, sizes, change stamps."""
    src = Location(src_url)
    listing = retry.call(src_url, lambda: src.fs.find(src.path, detail=True))
    if not listing:
        raise FormatError(f"{src_url}: no such file or directory (nothing to stage)")
    return fingerprint((posixpath.relpath(path, src.path), info) for path, info in listing.items())


def _relative(path: str, root: str) -> str:
    """The key below the source prefix, as listed (posixpath.relpath would normalise `..`)."""
    prefix = root.rstrip("/") + "/"
    return path[len(prefix) :] if path.startswith(prefix) else path


def stage_source(src_url: str, cache_dir: str) -> str:
    """A local copy of the source directory (path), made once per remote state."""
    src = Location(src_url)
    if src.is_local:
        return src_url
    stamp = remote_stamp(src_url)
    target = Path(cache_dir).resolve() / hashlib.sha256(src_url.encode()).hexdigest()[:16]
    if (target / STAMP).is_file() and (target / STAMP).read_text() == stamp:
        return str(target)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    # Every key checked before anything is fetched: a key with `../` never lands outside.
    keys = retry.call(src_url, lambda: src.fs.find(src.path))
    places = [(path, inside(target, _relative(path, src.path), where=src_url)) for path in keys]
    for path, local in places:
        local.parent.mkdir(parents=True, exist_ok=True)
        retry.call(path, functools.partial(src.fs.get_file, path, str(local)))
    if remote_stamp(src_url) != stamp:
        raise FormatError(f"{src_url}: changed while it was being staged; run again")
    (target / STAMP).write_text(stamp)
    return str(target)
