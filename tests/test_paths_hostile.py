"""Hostile paths: nothing outside the destination is written, nothing outside the source is
read. A remote key with `../`, a symlink planted at the lock's name, a destination reached
through a symlink into the source, an asset or a weight file symlinked to a file outside, and a
destination that is a file or a symlink: each refused with one line, the thing outside
untouched."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import fsspec
import pytest
from safetensors import safe_open

from ckpt_core.errors import FormatError
from ckpt_core.io.stage import stage_source
from ckptflow.cli import main
from tests.s3server import MotoServer, make_bucket

PROGRESS = re.compile(r"\d+%\|")
SECRET = b"aws_secret_access_key = hunter2-do-not-leak\n"


def digest(path: Path) -> dict[str, str]:
    """Every file below `path` (symlinks followed) and every symlink's target."""
    found: dict[str, str] = {}
    for p in sorted(path.rglob("*")):
        key = str(p.relative_to(path))
        if p.is_symlink():
            found[key + " ->"] = os.readlink(p)
        if p.is_file():
            found[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return found


def files_outside(root: Path, *keep: Path) -> set[Path]:
    """Files under `root` that are not under any of `keep`."""
    return {
        p
        for p in root.rglob("*")
        if p.is_file() and not any(p == k or k in p.parents for k in keep)
    }


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], *expected: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    # Progress bars (tqdm, on stderr) may run before the refusal; every other line is an error.
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("ckptflow: error:"), err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def src(tiny_hf_dir: Path, tmp_path: Path) -> Path:
    path = tmp_path / "src"
    shutil.copytree(tiny_hf_dir, path)
    return path


# -- 1. --cache-dir staging: a remote key never lands outside the cache directory ------------


def test_stage_refuses_a_memory_key_that_climbs_out(tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    root = f"/hostile-{uuid.uuid4().hex[:8]}"
    fs.pipe_file(f"{root}/src/config.json", b"{}")
    fs.pipe_file(f"{root}/src/run/../../../../escaped.txt", b"evil")
    cache = tmp_path / "deep" / "er" / "cache"
    cache.mkdir(parents=True)
    with pytest.raises(FormatError, match=r"run/\.\./\.\./\.\./\.\./escaped\.txt"):
        stage_source(f"memory://{root}/src", str(cache))
    assert not list(tmp_path.rglob("escaped.txt"))
    assert files_outside(tmp_path, cache) == set()


def test_stage_refuses_an_s3_key_that_climbs_out(
    s3: MotoServer, tmp_path: Path, tiny_hf_dir: Path
) -> None:
    from s3fs import S3FileSystem

    bucket = f"b-{uuid.uuid4().hex[:12]}"
    make_bucket(bucket)
    fs = S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    fs.pipe_file(f"{bucket}/src/config.json", (tiny_hf_dir / "config.json").read_bytes())
    fs.pipe_file(f"{bucket}/src/run/../../../../escaped.txt", b"evil")
    keys = fs.find(f"{bucket}/src")
    if not any(".." in k for k in keys):
        pytest.skip(f"the S3 server normalised the key away: {keys}")
    cache = tmp_path / "deep" / "er" / "cache"
    cache.mkdir(parents=True)
    with pytest.raises(FormatError, match=r"escaped\.txt"):
        stage_source(f"s3://{bucket}/src", str(cache))
    assert not list(tmp_path.rglob("escaped.txt"))
    assert files_outside(tmp_path, cache) == set()


# -- 2. the destination lock never writes through a planted link -----------------------------


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_lock_never_writes_through_a_planted_link(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    victim = tmp_path / "outside" / "authorized_keys"
    victim.parent.mkdir()
    victim.write_bytes(SECRET)
    lock = tmp_path / ".dst.ckptflow-lock"
    if kind == "symlink":
        lock.symlink_to(victim)
    else:
        os.link(victim, lock)
    refused(["convert", str(src), str(tmp_path / "dst")], capsys, ".dst.ckptflow-lock")
    assert victim.read_bytes() == SECRET
    assert not (tmp_path / "dst").exists()


# -- 3. destination, --base and source compared after resolving symlinks ---------------------


@pytest.mark.parametrize("via", ["source", "source/sub"])
def test_destination_through_a_symlink_into_the_source_is_refused(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], via: str
) -> None:
    (src / "sub").mkdir()
    before = digest(src)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / via.replace("source", "src"))
    refused(["convert", str(src), str(link / "out")], capsys, "overlaps the source")
    assert digest(src) == before


def test_destination_through_a_symlink_into_the_base_is_refused(
    src: Path, tiny_hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tmp_path / "base"
    shutil.copytree(tiny_hf_dir, base)
    before = digest(base)
    link = tmp_path / "link"
    link.symlink_to(base)
    argv = ["convert", str(src), str(link / "out"), "--base", str(base)]
    refused(argv, capsys, "overlaps the base model")
    assert digest(base) == before


# -- 4. an asset symlinked outside its directory is refused ----------------------------------


@pytest.mark.parametrize("asset", ["config.json", "tokenizer_config.json"])
def test_asset_symlinked_outside_the_source_is_refused(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], asset: str
) -> None:
    creds = tmp_path / "home" / ".aws" / "credentials"
    creds.parent.mkdir(parents=True)
    creds.write_bytes(SECRET)
    (src / asset).unlink(missing_ok=True)
    (src / asset).symlink_to(creds)
    before = digest(src)
    dst = tmp_path / "dst"
    refused(["convert", str(src), str(dst)], capsys, asset, str(creds))
    assert not dst.exists() and not list(tmp_path.glob(".dst*"))
    assert digest(src) == before and creds.read_bytes() == SECRET
    leaked = [
        p
        for p in tmp_path.rglob("*")
        if p.is_file() and not p.is_symlink() and p != creds and SECRET in p.read_bytes()
    ]
    assert leaked == []


def test_hub_cache_snapshot_symlinks_into_its_blobs_are_assets(
    tiny_hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """transformers' hub cache: snapshots/<rev>/NAME -> ../../blobs/<hash>, inside one repo."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in tiny_hf_dir.iterdir():
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / blob)
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob)
    dst = tmp_path / "dst"
    assert main(["convert", str(snapshot), str(dst)]) == 0, capsys.readouterr().err
    assert (dst / "config.json").read_bytes() == (tiny_hf_dir / "config.json").read_bytes()
    assert not (dst / "config.json").is_symlink()


# -- 4b. a weight file symlinked outside the source is refused (issue 11) --------------------


def _link_weights_out(src: Path, elsewhere: Path, how: str) -> Path:
    """Move the weights to `elsewhere` and leave a link in the source: `file` links
    model.safetensors itself, `shard` an index's shard, `secret` links model.safetensors to a
    credentials file. The link's target is returned."""
    elsewhere.mkdir(parents=True)
    target = elsewhere / "model.safetensors"
    shutil.move(src / "model.safetensors", target)
    if how == "secret":
        target = elsewhere / ".aws" / "credentials"
        target.parent.mkdir()
        target.write_bytes(SECRET)
    if how in ("file", "secret"):
        (src / "model.safetensors").symlink_to(target)
        return target
    shard = "model-00001-of-00001.safetensors"
    names = safe_open_names(target)
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, shard)}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    (src / shard).symlink_to(target)
    return target


def safe_open_names(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("how", ["file", "shard", "secret"])
def test_weight_file_symlinked_outside_the_source_is_refused(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    """`file`, `shard`: the link's target is a valid copy of the model's weights, so only where
    it lies refuses it; `secret`: none of the credentials' bytes show in the refusal."""
    target = _link_weights_out(src, tmp_path / "elsewhere", how)
    before = digest(src)
    dst = tmp_path / "dst"
    name = "model-00001-of-00001.safetensors" if how == "shard" else "model.safetensors"
    line = refused(["convert", str(src), str(dst)], capsys, str(src / name), str(target), "outside")
    assert "hunter2" not in line
    assert not dst.exists() and not list(tmp_path.glob(".dst*"))
    assert digest(src) == before


def test_weight_file_symlinked_inside_the_source_is_read(
    src: Path, tiny_hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A link that stays inside the source directory is the source's own file."""
    (src / "weights").mkdir()
    shutil.move(src / "model.safetensors", src / "weights" / "model.safetensors")
    (src / "model.safetensors").symlink_to(Path("weights") / "model.safetensors")
    dst = tmp_path / "dst"
    assert main(["convert", str(src), str(dst), "--dtype", "fp32"]) == 0, capsys.readouterr().err
    names = safe_open_names(tiny_hf_dir / "model.safetensors")
    assert sorted(safe_open_names(dst / "model.safetensors")) == sorted(names)
    with (
        safe_open(str(dst / "model.safetensors"), "pt") as out,
        safe_open(str(tiny_hf_dir / "model.safetensors"), "pt") as ref,
    ):
        for key in names:
            assert out.get_tensor(key).equal(ref.get_tensor(key)), key


# -- 5. item 7: a destination that is a file or a symlink is refused without --overwrite ----


def test_destination_that_is_a_file_is_refused(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = tmp_path / "notes.txt"
    dst.write_bytes(SECRET)
    refused(["convert", str(src), str(dst)], capsys, str(dst), "--overwrite")
    assert dst.read_bytes() == SECRET
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "src"]


def test_destination_that_is_a_symlink_is_refused_and_overwrite_replaces_only_the_link(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_bytes(SECRET)
    before = digest(target)
    dst = tmp_path / "dst"
    dst.symlink_to(target)
    refused(["convert", str(src), str(dst)], capsys, str(dst), "symlink", "--overwrite")
    assert dst.is_symlink() and digest(target) == before
    assert main(["convert", str(src), str(dst), "--overwrite"]) == 0, capsys.readouterr().err
    assert not dst.is_symlink() and (dst / "manifest.json").is_file()
    assert digest(target) == before


def test_split_output_through_a_symlink_into_the_model_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ckpt_core.errors import PublishError
    from ckpt_core.vlm.split import split
    from tests.fixtures.tiny_vlm import save_tiny_vlm

    model = tmp_path / "model"
    save_tiny_vlm(model)
    before = digest(model)
    link = tmp_path / "link"
    link.symlink_to(model)
    with pytest.raises(PublishError, match="overlaps the source model"):
        split(str(model), str(link / "split"))
    assert digest(model) == before
