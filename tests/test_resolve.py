"""Pretrained-path resolution: explicit > env > remote dir > local dir, any fsspec URL."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest

from ckpt_core.errors import CkptError
from ckpt_core.pipeline.resolve import pretrained_name, resolve


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_names() -> None:
    assert pretrained_name("pretrain", 512) == "pretrain_512.pth"
    assert pretrained_name("full_sft", 768, moe=True) == "full_sft_768_moe.pth"
    with pytest.raises(CkptError):
        pretrained_name("../etc", 512)
    with pytest.raises(CkptError):
        pretrained_name("pretrain", 0)


def test_order_explicit_env_remote_local(tmp_path: Path) -> None:
    local = tmp_path / "out"
    remote = tmp_path / "remote"
    envdir = tmp_path / "env"
    explicit = _touch(tmp_path / "mine.pth")
    for where in (local, remote, envdir):
        _touch(where / "full_sft_512.pth")
    env = {"CKPTFLOW_PRETRAINED_PATH": str(envdir)}
    args = dict(remote_dir=str(remote), local_dir=str(local))

    got = resolve("full_sft", 512, explicit=str(explicit), env=env, **args)
    assert (got.url, got.source) == (str(explicit), "explicit")
    got = resolve("full_sft", 512, env=env, **args)
    assert (got.url, got.source) == (
        str(envdir / "full_sft_512.pth"),
        "env:CKPTFLOW_PRETRAINED_PATH",
    )
    got = resolve("full_sft", 512, env={}, **args)
    assert (got.url, got.source) == (str(remote / "full_sft_512.pth"), "remote")
    (remote / "full_sft_512.pth").unlink()
    assert resolve("full_sft", 512, env={}, **args).url == str(local / "full_sft_512.pth")


def test_env_names_a_file_and_the_legacy_variable(tmp_path: Path) -> None:
    weights = _touch(tmp_path / "anything.pth")
    got = resolve("pretrain", 512, env={"MINILLM_PRETRAINED_PATH": str(weights)}, local_dir=None)
    assert (got.url, got.source) == (str(weights), "env:MINILLM_PRETRAINED_PATH")
    # CKPTFLOW_ wins over the legacy name when both are set.
    other = _touch(tmp_path / "other.pth")
    env = {"MINILLM_PRETRAINED_PATH": str(weights), "CKPTFLOW_PRETRAINED_PATH": str(other)}
    assert resolve("pretrain", 512, env=env).url == str(other)


def test_moe_name_is_distinct(tmp_path: Path) -> None:
    _touch(tmp_path / "pretrain_512.pth")
    with pytest.raises(CkptError, match="pretrain_512_moe.pth"):
        resolve("pretrain", 512, moe=True, local_dir=str(tmp_path), env={})
    _touch(tmp_path / "pretrain_512_moe.pth")
    assert resolve("pretrain", 512, moe=True, local_dir=str(tmp_path), env={}).url.endswith(
        "pretrain_512_moe.pth"
    )


def test_missing_explicit_path_is_an_error_not_a_fallthrough(tmp_path: Path) -> None:
    _touch(tmp_path / "out" / "pretrain_512.pth")
    with pytest.raises(CkptError, match="does not exist"):
        resolve(
            "pretrain", 512, explicit=str(tmp_path / "nope.pth"), local_dir=str(tmp_path / "out")
        )


def test_nothing_found_lists_every_candidate(tmp_path: Path) -> None:
    env = {"CKPTFLOW_PRETRAINED_PATH": str(tmp_path / "stale.pth")}
    with pytest.raises(CkptError) as info:
        resolve(
            "grpo",
            768,
            remote_dir=str(tmp_path / "remote"),
            local_dir=str(tmp_path / "out"),
            env=env,
        )
    message = str(info.value)
    for expected in (
        f"env:CKPTFLOW_PRETRAINED_PATH: {tmp_path / 'stale.pth'}",
        f"remote: {tmp_path / 'remote' / 'grpo_768.pth'}",
        f"local: {tmp_path / 'out' / 'grpo_768.pth'}",
    ):
        assert expected in message


def test_fsspec_remote_dir() -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe("/ckpts/rlhf_512.pth", b"x")
    got = resolve("rlhf", 512, remote_dir="memory://ckpts", local_dir=None, env={})
    assert got.url == "memory://ckpts/rlhf_512.pth" and got.source == "remote"
    fs.rm("/ckpts/rlhf_512.pth")


def test_command_result_is_json_ready(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("CKPTFLOW_PRETRAINED_PATH", "MINILLM_PRETRAINED_PATH"):
        monkeypatch.delenv(var, raising=False)
    _touch(tmp_path / "spo_512.pth")
    result = resolve("spo", 512, local_dir=str(tmp_path)).as_dict()
    assert result["url"] == str(tmp_path / "spo_512.pth")
    assert result["source"] == "local"
    assert isinstance(result["searched"], list)
