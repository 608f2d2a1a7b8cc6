"""The CLI: expected failures are one clear line, a non-zero exit and nothing at the destination."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from safetensors.torch import save_file

from ckptflow.cli import main


def _broken_copy(tiny_hf_dir: Path, tmp_path: Path, case: str) -> Path:
    src = tmp_path / "src"
    shutil.copytree(tiny_hf_dir, src)
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    if case == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif case == "header_past_end":
        weights.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    elif case in ("index_escapes", "index_missing_file"):
        target = (
            "../../etc/passwd" if case == "index_escapes" else "model-00009-of-00009.safetensors"
        )
        (src / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {"model.norm.weight": target}})
        )
    elif case == "unknown_format":
        weights.unlink()
        (src / "notes.txt").write_text("not a checkpoint")
    return src


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("truncated", "model.safetensors"),
        ("header_past_end", "runs past the end"),
        ("index_escapes", "outside the checkpoint directory"),
        ("index_missing_file", "do not exist"),
        ("unknown_format", "not a checkpoint ckptflow can read"),
    ],
)
def test_bad_inputs_fail_cleanly(
    tiny_hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, message: str
) -> None:
    src = _broken_copy(tiny_hf_dir, tmp_path, case)
    dst = tmp_path / "dst"
    code = main(["convert", str(src), str(dst)])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ckptflow: error:"), err
    assert message in lines[0] and "Traceback" not in err
    assert not dst.exists()
    assert not list(tmp_path.glob(".dst*"))


def test_missing_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "dst")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_detect_json(tiny_hf_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["detect", str(tiny_hf_dir), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["format"] == "hf"
    assert facts["tensors"] == 27 and facts["files"] == ["model.safetensors"]


def test_convert_prints_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    src = tmp_path / "src"
    src.mkdir()
    save_file({"w": torch.ones(3)}, str(src / "model.safetensors"), metadata={"format": "pt"})
    assert main(["convert", str(src), str(tmp_path / "dst"), "--max-shard-size", "200KB"]) == 0
    out = capsys.readouterr().out
    # No config: identical to what was read, but never an "OK" on the model (issue 10).
    assert "identical to the source" in out and "BF16: 1" in out
    assert "keys not checked: no config" in out and "OK:" not in out


def test_convert_rerun_prints_nothing_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    src = tmp_path / "src"
    src.mkdir()
    save_file({"w": torch.ones(3)}, str(src / "model.safetensors"), metadata={"format": "pt"})
    assert main(["convert", str(src), str(tmp_path / "dst"), "--max-shard-size", "200KB"]) == 0
    capsys.readouterr()
    assert main(["convert", str(src), str(tmp_path / "dst"), "--max-shard-size", "200KB"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_resolve_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("CKPTFLOW_PRETRAINED_PATH", "MINILLM_PRETRAINED_PATH"):
        monkeypatch.delenv(var, raising=False)
    local, remote = tmp_path / "out", tmp_path / "remote"
    local.mkdir()
    remote.mkdir()
    (local / "full_sft_512.pth").write_bytes(b"x")
    args = ["resolve", "--stage", "full_sft", "--hidden-size", "512"]
    assert main([*args, "--local-dir", str(local), "--remote-dir", str(remote)]) == 0
    assert capsys.readouterr().out.strip().endswith("out/full_sft_512.pth")
    (remote / "full_sft_512.pth").write_bytes(b"y")
    assert main([*args, "--local-dir", str(local), "--remote-dir", str(remote)]) == 0
    assert capsys.readouterr().out.strip().endswith("remote/full_sft_512.pth")


def test_resolve_command_names_what_it_did_not_find(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("CKPTFLOW_PRETRAINED_PATH", "MINILLM_PRETRAINED_PATH"):
        monkeypatch.delenv(var, raising=False)
    local = tmp_path / "out"
    local.mkdir()
    (local / "full_sft_512.pth").write_bytes(b"x")
    args = ["resolve", "--stage", "full_sft", "--hidden-size", "512"]
    assert main([*args, "--path", str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth" in capsys.readouterr().err
    assert main([*args, "--moe", "--local-dir", str(local)]) == 2
    err = capsys.readouterr().err
    assert "full_sft_512_moe.pth" in err and str(local) in err
