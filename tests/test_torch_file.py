"""Raw torch.save state dicts (.pth/.pt/.bin) and the strict key check against a config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt_core.errors import FormatError, KeyMismatchError, UnsafeFileError
from ckpt_core.families.hf_layout import model_layout
from ckpt_core.families.model_config import load_config
from ckpt_core.formats.protocol import TensorInfo
from ckpt_core.formats.registry import detect, open_reader
from ckpt_core.formats.torch_file import TorchFileFormat
from ckpt_core.io.storage import Location
from ckpt_core.pipeline.conversion import ConversionPlan, options_from
from ckpt_core.pipeline.convert import ConvertOptions, convert, plan_conversion, reader_for
from ckpt_core.pipeline.modelcheck import key_mismatches
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


def _plan(src: Path, tmp_path: Path, **flags: Any) -> ConversionPlan:
    """The pipeline checks every source's keys against the model its config describes."""
    return plan_conversion(str(src), str(tmp_path / "out"), options_from(dtype="keep", **flags))


def test_strict_keys_against_base(
    tmp_path: Path, untied: dict[str, torch.Tensor], config_dir: Path
) -> None:
    torch.save(untied, tmp_path / "m.pth")
    plan = _plan(tmp_path / "m.pth", tmp_path, base=str(config_dir))
    assert set(plan.dtypes) == set(untied)
    assert "keys checked" in plan.source["keys"]


def test_key_mismatch_against_base_names_both_sides(
    tmp_path: Path, untied: dict[str, torch.Tensor], config_dir: Path
) -> None:
    broken = dict(untied)
    del broken["model.norm.weight"]
    broken["model.layers.9.mlp.up_proj.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "m.pth")
    with pytest.raises(KeyMismatchError) as info:
        _plan(tmp_path / "m.pth", tmp_path, base=str(config_dir))
    message = str(info.value)
    assert "missing 1: model.norm.weight" in message
    assert "unexpected 1: model.layers.9.mlp.up_proj.weight" in message
    assert "m.pth" in message


def test_config_beside_the_file_triggers_the_check(
    tmp_path: Path, untied: dict[str, torch.Tensor]
) -> None:
    src = tmp_path / "src"
    tiny_qwen2_config().save_pretrained(src)
    partial = {k: v for k, v in untied.items() if "layers.1." not in k}
    torch.save(partial, src / "m.pth")
    with pytest.raises(KeyMismatchError, match="missing 12"):
        _plan(src, tmp_path)
    plan = _plan(src, tmp_path, allow_missing=["model.layers.1.*"])
    assert set(plan.dtypes) == set(partial)


def test_key_rule_directly(untied: dict[str, torch.Tensor], config_dir: Path) -> None:
    layout = model_layout(load_config(Location(str(config_dir))), str(config_dir))
    index = {n: TensorInfo(n, t.dtype, tuple(t.shape)) for n, t in untied.items()}

    def check(names: list[str], allow: tuple[str, ...] = ()) -> dict[str, str]:
        chosen = {n: index[n] for n in names}
        return key_mismatches(chosen, layout, allow, where="m.pth", config_at=str(config_dir))

    assert check(list(untied)) == {}
    with pytest.raises(KeyMismatchError, match=r"missing 1: lm_head\.weight"):
        check([k for k in untied if k != "lm_head.weight"])
    assert check([k for k in untied if "q_proj" not in k], ("*.q_proj.*",)) == {}


def test_fp16_tied_stored_twice_minimind_style(tmp_path: Path) -> None:
    model = build_tiny_qwen2(seed=4, tie_word_embeddings=True)
    # MiniMind: {k: v.half()} gives the tied pair two separate storages.
    state = {k: v.half() for k, v in model.state_dict().items()}
    assert "lm_head.weight" in state and "model.embed_tokens.weight" in state
    src = tmp_path / "src"
    src.mkdir()
    torch.save(state, src / "full_sft_64.pth")
    model.config.save_pretrained(src)
    plan = _plan(src, tmp_path)
    assert "lm_head.weight" not in plan.dtypes  # dropped: transformers saves a tied pair once
    assert plan.dropped == ("lm_head.weight",)
    assert set(plan.dtypes.values()) == {"float16"}
    reader = reader_for(plan)
    assert torch.equal(reader.read("model.embed_tokens.weight"), state["model.embed_tokens.weight"])


def test_tied_in_config_but_trained_apart_is_refused(tmp_path: Path) -> None:
    model = build_tiny_qwen2(seed=4, tie_word_embeddings=True)
    state = {k: v.half() for k, v in model.state_dict().items()}
    src = tmp_path / "src"
    model.config.save_pretrained(src)
    state["lm_head.weight"] = state["lm_head.weight"] + 1  # "tied" in config but trained apart
    torch.save(state, src / "full_sft_64.pth")
    with pytest.raises(KeyMismatchError, match="tied in the model config but differ"):
        _plan(src, tmp_path)


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
