"""Every format's reader keeps the protocol's promises, on checkpoints the real tools wrote:
an index without reading data, and `UnknownTensorError` for a name the index does not hold."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckpt_core.errors import UnknownTensorError
from ckpt_core.formats.protocol import OpenOptions
from ckpt_core.formats.registry import FORMATS, open_reader, table
from ckpt_core.vlm.split import split
from ckpt_core.vlm.tiny_trainer import train
from tests.fixtures.bagel_cache import build_bagel_fixtures
from tests.fixtures.deepspeed_cache import deepspeed_fixtures
from tests.fixtures.fsdp_cache import build_fsdp_fixtures
from tests.fixtures.megatron_cache import megatron_fixtures
from tests.fixtures.tiny_vlm import save_tiny_vlm


def _hf(tmp: Path) -> tuple[str, OpenOptions]:
    save_file({"w": torch.ones(2, 3)}, str(tmp / "model.safetensors"))
    return str(tmp), OpenOptions()


def _hf_bin(tmp: Path) -> tuple[str, OpenOptions]:
    torch.save({"w": torch.ones(2, 3)}, tmp / "pytorch_model.bin")
    return str(tmp), OpenOptions()


def _torch_file(tmp: Path) -> tuple[str, OpenOptions]:
    torch.save({"model": {"w": torch.ones(2, 3)}}, tmp / "weights.pth")
    return str(tmp / "weights.pth"), OpenOptions()


def _peft_adapter(tmp: Path) -> tuple[str, OpenOptions]:
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    save_file({name: torch.ones(2, 3)}, str(tmp / "adapter_model.safetensors"))
    (tmp / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 4}')
    return str(tmp), OpenOptions()


def _deepspeed(tmp: Path) -> tuple[str, OpenOptions]:
    return str(deepspeed_fixtures() / "stage3" / "ckpt"), OpenOptions()


def _dcp(tmp: Path) -> tuple[str, OpenOptions]:
    return str(build_fsdp_fixtures() / "dcp"), OpenOptions()


def _bagel(tmp: Path) -> tuple[str, OpenOptions]:
    return str(build_bagel_fixtures() / "dcp"), OpenOptions()


def _megatron(tmp: Path) -> tuple[str, OpenOptions]:
    case = megatron_fixtures() / "llama_tp2_gqa"
    return str(case / "ckpt"), OpenOptions(base=str(case / "base"))


def _fsdp_ranks(tmp: Path) -> tuple[str, OpenOptions]:
    return str(build_fsdp_fixtures() / "verl"), OpenOptions()


def _tp_ranks(tmp: Path) -> tuple[str, OpenOptions]:
    save_tiny_vlm(tmp / "base")
    split(str(tmp / "base"), str(tmp / "split"))
    train(str(tmp / "split"), str(tmp / "epoch"), 2, steps=0)
    return str(tmp / "epoch"), OpenOptions(base=str(tmp / "base"))


SOURCES: dict[str, Callable[[Path], tuple[str, OpenOptions]]] = {
    "hf": _hf,
    "hf-bin": _hf_bin,
    "torch-file": _torch_file,
    "deepspeed": _deepspeed,
    "peft-adapter": _peft_adapter,
    "dcp": _dcp,
    "fsdp-ranks": _fsdp_ranks,
    "bagel": _bagel,
    "megatron": _megatron,
    "tp-ranks": _tp_ranks,
}


def test_every_registered_format_is_exercised_here() -> None:
    assert set(FORMATS) <= set(SOURCES)


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_unknown_name_raises_the_protocols_error(kind: str, tmp_path: Path) -> None:
    url, options = SOURCES[kind](tmp_path)
    reader = open_reader(url, options)
    assert reader.index(), "the fixture holds tensors"
    with pytest.raises(UnknownTensorError, match="no-such-tensor"):
        reader.read("no-such-tensor")
    read_range = getattr(reader, "read_range", None)
    if read_range is not None:
        with pytest.raises(UnknownTensorError, match="no-such-tensor"):
            read_range("no-such-tensor", 0, 1)


def test_a_format_name_registered_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        table([FORMATS["hf"], FORMATS["hf"]])
