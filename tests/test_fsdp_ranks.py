"""FSDP per-rank files (verl, BAGEL) written by a real FSDP2 run, merged by placement."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt_core.errors import FormatError, KeyMismatchError, UnsafeFileError
from ckpt_core.formats.registry import detect, open_reader
from ckpt_core.pipeline.convert import ConvertOptions, convert
from tests.fixtures.fsdp_cache import assert_loads_as_truth, fsdp_fixtures, load_truth

__all__ = ["fsdp_fixtures"]


@pytest.mark.parametrize("layout", ["verl", "bagel", "verl_plain"])
def test_detected(fsdp_fixtures: Path, layout: str) -> None:
    assert detect(str(fsdp_fixtures / layout)).name == "fsdp-ranks"


@pytest.mark.parametrize("layout", ["verl", "bagel"])
def test_every_tensor_bit_identical_to_truth(fsdp_fixtures: Path, layout: str) -> None:
    truth = load_truth(fsdp_fixtures)
    reader = open_reader(str(fsdp_fixtures / layout))
    assert set(reader.index()) == set(truth)
    # Uneven Shard(0): rank 0 holds 161 rows, rank 1 160 (inside a 161-row padded storage).
    assert reader.index()["lm_head.weight"].shape == (321, 64)
    for name, expected in truth.items():
        got = reader.read(name)
        assert got.is_contiguous() and torch.equal(got, expected), name
    assert len(reader.facts().files) == 2


def test_asset_dirs_prefer_huggingface_subdir(fsdp_fixtures: Path) -> None:
    reader = open_reader(str(fsdp_fixtures / "verl"))
    assert [Path(d.url).name for d in reader.asset_dirs()] == ["huggingface", "verl"]


def test_plain_tensor_is_replicated_not_concatenated(fsdp_fixtures: Path) -> None:
    plain = load_truth(fsdp_fixtures, "plain.safetensors")
    truth = load_truth(fsdp_fixtures) | plain
    reader = open_reader(str(fsdp_fixtures / "verl_plain"))
    assert set(reader.index()) == set(truth)
    for name in plain:  # a plain tensor and a Replicate() DTensor
        assert reader.index()[name].shape == (2, 3)  # concatenated would be (4, 3)
    for key, value in truth.items():
        assert torch.equal(reader.read(key), value), key


def test_replicate_dtensors_that_disagree_are_an_error(fsdp_fixtures: Path) -> None:
    reader = open_reader(str(fsdp_fixtures / "verl_disagree"))
    assert reader.index()["w"].shape == (3,)
    with pytest.raises(FormatError, match=r"rank_1\.pt: replicated tensor w differs"):
        reader.read("w")


def _save_ranks(where: Path, per_rank: list[dict[str, Any]], pattern: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    for rank, state in enumerate(per_rank):
        torch.save(state, where / pattern.format(rank))


def test_plain_tensors_that_disagree_are_an_error(tmp_path: Path) -> None:
    a = torch.arange(4.0)
    _save_ranks(tmp_path, [{"a": a}, {"a": a + 1}], "model_world_size_2_rank_{}.pt")
    reader = open_reader(str(tmp_path))
    with pytest.raises(FormatError, match=r"rank_1\.pt: replicated tensor a differs"):
        reader.read("a")


def test_rank_key_sets_must_agree(tmp_path: Path) -> None:
    _save_ranks(tmp_path, [{"a": torch.ones(2)}, {"b": torch.ones(2)}], "model_rank{:05d}.pt")
    with pytest.raises(KeyMismatchError, match="rank00001"):
        open_reader(str(tmp_path))


def _copy(fsdp_fixtures: Path, tmp_path: Path, layout: str = "verl") -> Path:
    return Path(shutil.copytree(fsdp_fixtures / layout, tmp_path / layout))


def test_missing_rank_is_named(fsdp_fixtures: Path, tmp_path: Path) -> None:
    root = _copy(fsdp_fixtures, tmp_path)
    (root / "model_world_size_2_rank_1.pt").unlink()
    with pytest.raises(FormatError, match=r"missing rank file\(s\) model_world_size_2_rank_1\.pt"):
        open_reader(str(root))


def test_stale_extra_rank_is_named(fsdp_fixtures: Path, tmp_path: Path) -> None:
    root = _copy(fsdp_fixtures, tmp_path)
    shutil.copy(root / "model_world_size_2_rank_1.pt", root / "model_world_size_2_rank_2.pt")
    with pytest.raises(FormatError, match=r"model_world_size_2_rank_2\.pt beyond world size 2"):
        open_reader(str(root))


def test_files_of_another_world_size_are_an_error(fsdp_fixtures: Path, tmp_path: Path) -> None:
    root = _copy(fsdp_fixtures, tmp_path)
    shutil.copy(root / "model_world_size_2_rank_1.pt", root / "model_world_size_4_rank_3.pt")
    with pytest.raises(FormatError, match=r"several world sizes \[2, 4\]"):
        open_reader(str(root))


def test_fsdp_config_world_size_must_agree(fsdp_fixtures: Path, tmp_path: Path) -> None:
    root = _copy(fsdp_fixtures, tmp_path)
    (root / "fsdp_config.json").write_text(json.dumps({"world_size": 4}))
    with pytest.raises(
        FormatError, match=r"fsdp_config\.json: world_size 4 but the rank files say 2"
    ):
        open_reader(str(root))


def test_without_fsdp_config_world_size_comes_from_names(
    fsdp_fixtures: Path, tmp_path: Path
) -> None:
    root = _copy(fsdp_fixtures, tmp_path)
    (root / "fsdp_config.json").unlink()
    reader = open_reader(str(root))
    truth = load_truth(fsdp_fixtures)
    assert torch.equal(reader.read("model.embed_tokens.weight"), truth["model.embed_tokens.weight"])


def test_bagel_world_size_from_metadata(fsdp_fixtures: Path, tmp_path: Path) -> None:
    root = _copy(fsdp_fixtures, tmp_path, "bagel")
    (root / "metadata.json").write_text(json.dumps({"world_size": 3, "checkpoint_type": "sharded"}))
    with pytest.raises(FormatError, match=r"model_rank00002\.pt of world size 3"):
        open_reader(str(root))


def test_bagel_ema_is_noted(fsdp_fixtures: Path, tmp_path: Path) -> None:
    root = _copy(fsdp_fixtures, tmp_path, "bagel")
    for rank in range(2):
        shutil.copy(root / f"model_rank{rank:05d}.pt", root / f"ema_rank{rank:05d}.pt")
    reader = open_reader(str(root))
    assert any("ema_rank" in note for note in reader.facts().notes)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_rank_file_is_refused(fsdp_fixtures: Path, tmp_path: Path) -> None:
    root = _copy(fsdp_fixtures, tmp_path)
    marker = tmp_path / "PWNED"
    torch.save({"model.norm.weight": _Evil(marker)}, root / "model_world_size_2_rank_1.pt")
    with pytest.raises(UnsafeFileError, match=r"rank_1\.pt.*system"):
        open_reader(str(root))
    assert not marker.exists()


@pytest.mark.parametrize("layout", ["verl", "bagel"])
def test_convert_end_to_end_loads_in_transformers(
    fsdp_fixtures: Path, tmp_path: Path, layout: str
) -> None:
    out = tmp_path / "hf"
    convert(
        str(fsdp_fixtures / layout),
        str(out),
        ConvertOptions(dtype="fp32", base=str(fsdp_fixtures / "base")),
    )
    assert_loads_as_truth(out, load_truth(fsdp_fixtures))
