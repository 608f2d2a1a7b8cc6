"""`ckptflow verify`: a good conversion verifies clean (with its manifest and from its index
alone); each corruption (a flipped byte, two same-shape tensors swapped, a missing key, a dtype
change, a truncated shard) fails with a line naming the file and the tensor; `--against` a real
DeepSpeed ZeRO-3 checkpoint holds for its own conversion and fails for another model's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckpt_core.formats.safetensors_header import read_header
from ckpt_core.io.storage import Location
from ckpt_core.pipeline.conversion import options_from
from ckpt_core.pipeline.convert import convert
from ckptflow.cli import main
from tests.helpers.deepspeed_truth import ckpt

GATE = "model.layers.0.mlp.gate_proj.weight"  # [128, 64], as is up_proj
UP = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def converted(tiny_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2 converted to bf16 in several shards."""
    out = tmp_path_factory.mktemp("verify") / "out"
    convert(str(tiny_hf_dir), str(out), options_from(dtype="bf16", max_shard_size="60KB"))
    assert len(list(out.glob("*.safetensors"))) > 2
    return out


def verify(out: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    code = main(["verify", str(out), "--json", *args])
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert code == (0 if report["ok"] else 1)
    return code, report


def status(report: dict[str, Any]) -> dict[str, str]:
    return {c["name"]: c["status"] for c in report["checks"]}


def named(report: dict[str, Any], file: str, tensor: str) -> list[dict[str, str]]:
    """The failures naming both `file` and `tensor`."""
    return [f for f in report["failures"] if f["file"] == file and tensor in f["tensor"]]


def shard_of(out: Path, tensor: str) -> str:
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    return str(weight_map[tensor])


def damaged(converted: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(converted, copy)
    return copy


def rewrite(path: Path, change: Any) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_a_good_conversion_verifies_clean(
    converted: Path, tiny_hf_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = verify(converted, capsys, "--against", str(tiny_hf_dir), "--logits")
    assert code == 0, report["failures"]
    assert status(report) == {
        "files": "ok", "index": "ok", "keys": "ok", "against": "ok", "logits": "ok",
    }  # fmt: skip
    assert report["against"]["compared"] == 27 and len(report["tensors"]) == 27
    assert all(t["max_abs_diff"] == 0.0 for t in report["tensors"])
    assert main(["verify", str(converted)]) == 0  # the table
    table = capsys.readouterr().out
    assert "verdict: OK" in table and "Qwen2ForCausalLM via AutoModelForCausalLM" in table


def test_from_the_index_alone(
    converted: Path, tiny_hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = damaged(converted, tmp_path)
    (bare / "manifest.json").unlink()
    (bare / "_SUCCESS").unlink()
    code, report = verify(bare, capsys)
    assert code == 0 and status(report)["files"] == "skipped" and status(report)["index"] == "ok"
    # A directory transformers wrote (one file, no manifest) as well.
    assert verify(tiny_hf_dir, capsys)[0] == 0


def test_a_flipped_byte(
    converted: Path, tiny_hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = damaged(converted, tmp_path)
    shard = shard_of(out, UP)
    entry = read_header(Location(str(out)), shard).entries[UP]
    data = bytearray((out / shard).read_bytes())
    data[entry.begin + 101] ^= 0x10
    (out / shard).write_bytes(bytes(data))
    code, report = verify(out, capsys, "--against", str(tiny_hf_dir))
    assert code == 1
    assert [f["message"] for f in report["failures"] if f["check"] == "files"] == [
        "sha256 differs from manifest.json (its bytes changed)"
    ]
    assert named(report, shard, UP) and status(report)["keys"] == "ok"
    assert [f["tensor"] for f in report["failures"] if f["check"] == "against"] == [UP]


def test_two_tensors_of_one_shape_swapped(
    converted: Path, tiny_hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = damaged(converted, tmp_path)
    assert shard_of(out, GATE) == shard_of(out, UP)
    shard = shard_of(out, GATE)

    def swap(t: dict[str, torch.Tensor]) -> None:
        t[GATE], t[UP] = t[UP], t[GATE]

    rewrite(out / shard, swap)
    code, report = verify(out, capsys, "--against", str(tiny_hf_dir))
    assert code == 1 and status(report)["keys"] == "ok"  # names and shapes are all right
    assert named(report, shard, GATE) and named(report, shard, UP)


def test_a_missing_key(
    converted: Path, tiny_hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = damaged(converted, tmp_path)
    shard = shard_of(out, UP)
    rewrite(out / shard, lambda t: t.pop(UP))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    del index["weight_map"][UP]  # the index agrees: only the model's keys tell
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    code, report = verify(out, capsys, "--against", str(tiny_hf_dir))
    assert code == 1
    keys = [f for f in report["failures"] if f["check"] == "keys"]
    assert [(f["file"], f["tensor"]) for f in keys] == [("model.safetensors.index.json", UP)]
    assert "missing" in keys[0]["message"]
    assert any(f["tensor"] == UP for f in report["failures"] if f["check"] == "against")
    assert {f["file"] for f in report["failures"] if f["check"] == "files"} == {
        shard,
        "model.safetensors.index.json",
    }


def test_a_dtype_change(
    converted: Path, tiny_hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = damaged(converted, tmp_path)
    shard = shard_of(out, UP)

    def to_fp16(t: dict[str, torch.Tensor]) -> None:
        t[UP] = t[UP].to(torch.float16)

    rewrite(out / shard, to_fp16)
    (out / "manifest.json").unlink()  # no manifest to catch it either
    (out / "_SUCCESS").unlink()
    code, report = verify(out, capsys, "--against", str(tiny_hf_dir))
    assert code == 1
    found = named(report, shard, UP)
    assert any("dtype F16, expected BF16" in f["message"] for f in found)


def test_a_truncated_shard(
    converted: Path, tiny_hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = damaged(converted, tmp_path)
    shard = shard_of(out, UP)
    last = list(read_header(Location(str(out)), shard).entries)[-1]
    data = (out / shard).read_bytes()
    (out / shard).write_bytes(data[:-100])
    code, report = verify(out, capsys)
    assert code == 1
    index = [f for f in report["failures"] if f["check"] == "index"]
    assert index[0]["file"] == shard and last in index[0]["tensor"]
    assert "truncated" in index[0]["message"]
    assert any("bytes, manifest.json says" in f["message"] for f in named(report, shard, ""))
    table = (main(["verify", str(out)]), capsys.readouterr().out)
    assert table[0] == 1 and f"{shard}: {last}" in table[1]


def test_against_a_deepspeed_zero3_checkpoint(
    ds_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "stage3"
    base = str(ds_root / "stage3" / "base")
    convert(ckpt(ds_root, "stage3"), str(out), options_from(dtype="bf16", base=base))
    code, report = verify(out, capsys, "--against", ckpt(ds_root, "stage3"))
    assert code == 0, report["failures"]
    assert report["against"]["format"] == "deepspeed"
    # Another training run of the same model (other seed): same names and shapes, other values.
    code, report = verify(out, capsys, "--against", ckpt(ds_root, "stage2"))
    assert code == 1 and status(report)["against"] == "FAILED"
    assert status(report)["keys"] == "ok"
    differ = [f for f in report["failures"] if "values differ" in f["message"]]
    assert differ and all(f["file"].endswith(".safetensors") and f["tensor"] for f in differ)
    # Within a tolerance wider than the runs' difference, it holds (tolerances when asked).
    worst = max(t["max_abs_diff"] for t in report["tensors"])
    assert (
        verify(out, capsys, "--against", ckpt(ds_root, "stage2"), "--atol", str(2 * worst))[0] == 0
    )
