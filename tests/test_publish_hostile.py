"""Links planted where ckptflow publishes are never followed: a symlink at the local staging
directory's name is refused in one line (its target untouched); symlinks planted inside a
resumable staging directory are removed as links by the leftover sweep (never followed, never
published), and the resumed output is exactly what its manifest says."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ckpt_core.errors import PublishError
from ckpt_core.io import retry
from ckpt_core.io.storage import Location
from ckpt_core.pipeline import convert as core
from ckpt_core.pipeline.convert import ConvertOptions, convert
from ckpt_core.pipeline.publish import INCOMPLETE, STAGING_SUFFIX

OPTIONS = ConvertOptions(dtype="fp32", max_shard_bytes=60_000)


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    """A directory of someone else's, with a file; the test checks it is left exactly as is."""
    other = tmp_path / "someone-else"
    other.mkdir()
    (other / "secret.txt").write_text("not ckptflow's")
    before = sorted(other.rglob("*"))
    yield other
    assert sorted(other.rglob("*")) == before
    assert (other / "secret.txt").read_text() == "not ckptflow's"


def _as_manifest_says(out: Path) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    assert {p.name for p in out.iterdir()} == {*manifest["files"], "manifest.json", "_SUCCESS"}
    for name, entry in manifest["files"].items():
        assert not (out / name).is_symlink(), name
        data = (out / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


def test_symlink_at_the_staging_name_is_refused(
    tiny_hf_dir: Path, tmp_path: Path, outside: Path
) -> None:
    (tmp_path / f".out{STAGING_SUFFIX}").symlink_to(outside)
    with pytest.raises(PublishError) as refused:
        convert(str(tiny_hf_dir), str(tmp_path / "out"), OPTIONS)
    line = str(refused.value)
    assert "\n" not in line and "staging directory's name is a symlink" in line
    assert not (tmp_path / "out").exists()


def test_links_planted_in_a_resumable_staging_dir_are_swept_not_followed(
    tiny_hf_dir: Path, tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = core.write_safetensors
    written: list[str] = []

    def dies_after_one(root: Location, filename: str, *args: Any) -> Any:
        if written:
            raise ConnectionAbortedError("simulated crash")
        written.append(filename)
        return real(root, filename, *args)

    monkeypatch.setattr(core, "write_safetensors", dies_after_one)
    monkeypatch.setattr(retry, "is_transient", lambda e: False)
    out = tmp_path / "out"
    with pytest.raises(ConnectionAbortedError):
        convert(str(tiny_hf_dir), str(out), OPTIONS, workers=1)
    staging = tmp_path / f".out{STAGING_SUFFIX}"
    assert (staging / INCOMPLETE).is_file()  # kept for the rerun
    (staging / "dir-link").symlink_to(outside)
    (staging / "file-link.safetensors").symlink_to(outside / "secret.txt")
    monkeypatch.setattr(core, "write_safetensors", real)
    convert(str(tiny_hf_dir), str(out), OPTIONS)
    _as_manifest_says(out)
    assert not staging.exists()
