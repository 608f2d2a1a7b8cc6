"""Raw torch.save state dicts (.pth/.pt/.bin) and the strict key check against a config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt_core.errors import FormatError, KeyMismatchError, UnsafeFileError
from ckpt_core.formats.keycheck import check_keys
from ckpt_core.formats.protocol import OpenOptions
from ckpt_core.formats.registry import detect, open_reader
from ckpt_core.formats.torch_file import TorchFileFormat
from ckpt_core.io.storage import Location
from ckpt_core.pipeline.convert import ConvertOptions, convert
from tests.fixtures.tiny import build_tiny_qwen2, tiny_qwen2_config


@pytest.fixture(scope="module")
def untied() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in build_tiny_qwen2(seed=3).state_dict().items()}


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("config")
    tiny_qwen2_config(tie_word_embeddings=False).save_pretrained(where)
    return where


def _wrap(state: dict[str, torch.Tensor], wrapper: str | None) -> Any:
    if wrapper is None:
        return state
    return {wrapper: state, "epoch": 3, "optimizer": {"lr": 0.1}}


@pytest.mark.parametrize("wrapper", [None, "model", "module", "state_dict"])
@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin"])
def test_bare_and_wrapped(
    tmp_path: Path, untied: dict[str, torch.Tensor], wrapper: str | None, suffix: str
) -> None:
    path = tmp_path / f"weights{suffix}"
    torch.save(_wrap(untied, wrapper), path)
    for url in (str(path), str(tmp_path)):  # the file, or the dir holding exactly one
        assert detect(url).name == "torch-file"
        reader = open_reader(url)
        assert list(reader.index()) == list(untied)
        for name, value in untied.items():
            assert torch.equal(reader.read(name), value), name
        notes = " ".join(reader.facts().notes)
        assert ("under" in notes) == (wrapper is not None)
        assert reader.facts().files == [path.name]


def test_strict_keys_against_base(
    tmp_path: Path, untied: dict[str, torch.Tensor], config_dir: Path
) -> None:
    torch.save(untied, tmp_path / "m.pth")
    reader = open_reader(str(tmp_path / "m.pth"), OpenOptions(base=str(config_dir)))
    assert set(reader.index()) == set(untied)
    assert any("keys checked" in n for n in reader.facts().notes)


def test_key_mismatch_against_base_names_both_sides(
    tmp_path: Path, untied: dict[str, torch.Tensor], config_dir: Path
) -> None:
    broken = dict(untied)
    del broken["model.norm.weight"]
    broken["model.layers.9.mlp.up_proj.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "m.pth")
    with pytest.raises(KeyMismatchError) as info:
        open_reader(str(tmp_path / "m.pth"), OpenOptions(base=str(config_dir)))
    message = str(info.value)
    assert "missing 1: model.norm.weight" in message
    assert "unexpected 1: model.layers.9.mlp.up_proj.weight" in message
    assert "m.pth" in message


def test_config_beside_the_file_triggers_the_check(
    tmp_path: Path, untied: dict[str, torch.Tensor]
) -> None:
    tiny_qwen2_config().save_pretrained(tmp_path)
    partial = {k: v for k, v in untied.items() if "layers.1." not in k}
    torch.save(partial, tmp_path / "m.pth")
    with pytest.raises(KeyMismatchError, match="missing 12"):
        open_reader(str(tmp_path))
    reader = open_reader(str(tmp_path), OpenOptions(allow_missing=("model.layers.1.*",)))
    assert set(reader.index()) == set(partial)


def test_check_keys_directly(untied: dict[str, torch.Tensor], config_dir: Path) -> None:
    assert check_keys(list(untied), str(config_dir)) == []
    with pytest.raises(KeyMismatchError, match=r"missing 1: lm_head\.weight"):
        check_keys([k for k in untied if k != "lm_head.weight"], str(config_dir))
    names = [k for k in untied if "q_proj" not in k]
    assert check_keys(names, str(config_dir), ["*.q_proj.*"]) == []


def test_fp16_tied_stored_twice_minimind_style(tmp_path: Path) -> None:
    model = build_tiny_qwen2(seed=4, tie_word_embeddings=True)
    # MiniMind: {k: v.half()} gives the tied pair two separate storages.
    state = {k: v.half() for k, v in model.state_dict().items()}
    assert "lm_head.weight" in state and "model.embed_tokens.weight" in state
    torch.save(state, tmp_path / "full_sft_64.pth")
    model.config.save_pretrained(tmp_path)
    reader = open_reader(str(tmp_path))
    index = reader.index()
    assert "lm_head.weight" not in index  # dropped: transformers saves a tied pair once
    assert all(info.dtype == torch.float16 for info in index.values())
    assert any("tied" in n and "lm_head.weight" in n for n in reader.facts().notes)
    assert torch.equal(reader.read("model.embed_tokens.weight"), state["model.embed_tokens.weight"])


def test_tied_in_config_but_trained_apart_is_refused(tmp_path: Path) -> None:
    model = build_tiny_qwen2(seed=4, tie_word_embeddings=True)
    state = {k: v.half() for k, v in model.state_dict().items()}
    model.config.save_pretrained(tmp_path)
    state["lm_head.weight"] = state["lm_head.weight"] + 1  # "tied" in config but trained apart
    torch.save(state, tmp_path / "full_sft_64.pth")
    with pytest.raises(KeyMismatchError, match="tied in the model config but differ"):
        open_reader(str(tmp_path))


def test_fp16_tied_convert_end_to_end(tmp_path: Path) -> None:
    from transformers import Qwen2ForCausalLM

    model = build_tiny_qwen2(seed=4, tie_word_embeddings=True)
    state = {k: v.half() for k, v in model.state_dict().items()}
    src = tmp_path / "src"
    src.mkdir()
    torch.save(state, src / "pretrain_64.pth")
    model.config.save_pretrained(src)
    out = tmp_path / "hf"
    convert(str(src), str(out), ConvertOptions(dtype="keep"))
    loaded, info = Qwen2ForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for name, value in loaded.state_dict().items():
        assert torch.equal(value.half(), state[name]), name
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_hf_directory_is_not_stolen(tmp_path: Path, untied: dict[str, torch.Tensor]) -> None:
    torch.save(untied, tmp_path / "pytorch_model.bin")
    tiny_qwen2_config().save_pretrained(tmp_path)
    assert not TorchFileFormat().detect(Location(str(tmp_path)))
    assert detect(str(tmp_path)).name != "torch-file"


def test_directory_with_two_files_is_not_guessed(
    tmp_path: Path, untied: dict[str, torch.Tensor]
) -> None:
    torch.save(untied, tmp_path / "a.pth")
    torch.save(untied, tmp_path / "b.pth")
    assert not TorchFileFormat().detect(Location(str(tmp_path)))
    with pytest.raises(FormatError, match="exactly one"):
        open_reader(str(tmp_path), format_name="torch-file")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    torch.save({"w": torch.ones(2), "x": _Evil(marker)}, tmp_path / "m.pth")
    with pytest.raises(UnsafeFileError, match="system"):
        open_reader(str(tmp_path / "m.pth"))
    assert not marker.exists()


def test_legacy_format_is_a_clear_error(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "m.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(FormatError, match="legacy"):
        open_reader(str(tmp_path / "m.pt"))
