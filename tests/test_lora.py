"""LoRA adapters: fused into --base exactly as PEFT's merge_and_unload() merges them, or kept as
a PEFT adapter directory; adapters ckptflow does not fuse are refused by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from ckpt_core.formats.registry import detect
from ckptflow.cli import main
from tests.fixtures.gen_lora_deepspeed import SEED as TRAINED_SEED
from tests.fixtures.lora_cache import lora_deepspeed_fixture
from tests.fixtures.tiny import build_tiny_qwen2

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _peft_model(**lora: Any) -> Any:
    """A tiny Qwen2 with a LoRA whose A and B are random (B is zero at init: a no-op)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **lora})
    model = get_peft_model(build_tiny_qwen2(seed=5), config)
    torch.manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # lora_A, lora_B and the modules to save
                param.copy_(torch.randn_like(param) * 0.2)
    return model


def _adapter_case(tmp_path: Path, **lora: Any) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """(adapter dir, base dir, truth): the truth is merge_and_unload()'s state dict."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    build_tiny_qwen2(seed=5).save_pretrained(base)
    model = _peft_model(**lora)
    model.save_pretrained(adapter)
    merged = model.merge_and_unload()
    truth = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    return adapter, base, truth


def _convert(src: Path, dst: Path, *flags: str) -> int:
    return main(["convert", str(src), str(dst), "--dtype", "fp32", *flags])


def _load_strict(out: Path, truth: dict[str, torch.Tensor]) -> None:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    state = model.state_dict()
    assert set(state) == set(truth)
    for name, value in truth.items():
        assert torch.equal(state[name], value), name


@pytest.mark.parametrize(
    "lora",
    [
        {"modules_to_save": ["lm_head"]},
        {"use_rslora": True},
        {
            "rank_pattern": {"model.layers.0.self_attn.q_proj": 2, "v_proj": 6},
            "alpha_pattern": {"k_proj": 3, r"layers\.1\.self_attn\.o_proj": 20},
        },
    ],
    ids=["modules_to_save", "rslora", "patterns"],
)
def test_adapter_dir_fused_equals_merge_and_unload(tmp_path: Path, lora: dict[str, Any]) -> None:
    adapter, base, truth = _adapter_case(tmp_path, **lora)
    assert detect(str(adapter)).name == "peft-adapter"
    out = tmp_path / "out"
    assert _convert(adapter, out, "--base", str(base)) == 0
    # The base's own files and names; no adapter file travels with a fused model.
    assert (out / "config.json").exists() and not (out / "adapter_config.json").exists()
    _load_strict(out, truth)
    base_weights = load_file(base / "model.safetensors")
    fused = load_file(out / "model.safetensors")
    changed = {n for n in base_weights if not torch.equal(base_weights[n], fused[n])}
    expected = {f"model.layers.{i}.self_attn.{t}.weight" for i in (0, 1) for t in TARGETS}
    assert changed == expected | ({"lm_head.weight"} if "modules_to_save" in lora else set())
    notes = " ".join(json.loads((out / "manifest.json").read_text())["source"]["notes"])
    assert "LoRA fused" in notes and "8 modules" in notes


def test_conv1d_fan_in_fan_out_fused_equals_merge_and_unload(tmp_path: Path) -> None:
    """GPT-2's Conv1D stores weights transposed: PEFT merges with fan_in_fan_out."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    base = GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    model = get_peft_model(base, lora)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.copy_(torch.randn_like(param) * 0.2)
    model.save_pretrained(tmp_path / "adapter")
    truth = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    out = tmp_path / "out"
    assert _convert(tmp_path / "adapter", out, "--base", str(tmp_path / "base")) == 0
    fused = load_file(out / "model.safetensors")
    before = load_file(tmp_path / "base" / "model.safetensors")
    changed = {n for n in before if not torch.equal(before[n], fused[n])}
    assert changed == {
        f"transformer.h.{i}.{m}.weight"
        for i in (0, 1)
        for m in lora.target_modules and ("attn.c_attn", "mlp.c_fc")
    }
    for name, value in fused.items():
        assert torch.equal(value, truth[name]), name


def test_keep_round_trips_through_peft(tmp_path: Path) -> None:
    from peft import PeftModel

    adapter, base, truth = _adapter_case(tmp_path, modules_to_save=["lm_head"])
    out = tmp_path / "kept"
    assert _convert(adapter, out, "--lora", "keep") == 0
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "manifest.json"} <= names
    assert "model.safetensors" not in names and "config.json" not in names
    assert load_file(out / "adapter_model.safetensors").keys() == (
        load_file(adapter / "adapter_model.safetensors").keys()
    )
    model = PeftModel.from_pretrained(build_tiny_qwen2(seed=5), out)
    state = model.merge_and_unload().state_dict()
    for name, value in truth.items():
        assert torch.equal(state[name], value), name


def _refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], adapter: Path, *flags: str) -> str:
    out = tmp_path / "refused"
    capsys.readouterr()  # what building the fixtures printed
    assert _convert(adapter, out, *flags) == 2
    assert not out.exists() and not list(tmp_path.glob(".refused*"))
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("ckptflow: error: ")
    return err


def test_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter, base, _ = _adapter_case(tmp_path)
    err = _refused(tmp_path, capsys, adapter)
    assert "PEFT" in err and "--base" in err and "--lora keep" in err

    config = json.loads((adapter / "adapter_config.json").read_text())
    for change, words in [
        ({"use_dora": True}, "DoRA"),
        ({"peft_type": "LOHA"}, "peft_type 'LOHA' is not LoRA"),
        ({"init_lora_weights": "pissa"}, "pissa"),
    ]:
        (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
        err = _refused(tmp_path, capsys, adapter, "--base", str(base))
        assert words in err and "adapter_config.json" in err, err
        assert words in _refused(tmp_path, capsys, adapter, "--lora", "keep")

    # An adapter for another model: a shape that does not fit the base is named.
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    other = tmp_path / "other"
    build_tiny_qwen2(seed=5, hidden_size=32, intermediate_size=64).save_pretrained(other)
    err = _refused(tmp_path, capsys, adapter, "--base", str(other))
    assert "is --base the model" in err


def test_trainer_deepspeed_checkpoint_fused_equals_merge_and_unload(tmp_path: Path) -> None:
    """Trainer + DeepSpeed ZeRO-2 + PEFT: the adapter from the fp32 masters, the names with
    `.default` and `modules_to_save.default`, adapter_config.json beside `global_step2/`."""
    fixture = lora_deepspeed_fixture()
    checkpoint, base = fixture / "run" / "checkpoint-2", fixture / "base"
    truth = load_file(fixture / "truth.safetensors")
    assert detect(str(checkpoint)).name == "deepspeed"
    out = tmp_path / "out"
    assert _convert(checkpoint, out, "--base", str(base)) == 0
    assert not (out / "adapter_config.json").exists()
    _load_strict(out, truth)
    before = load_file(base / "model.safetensors")
    assert sum(not torch.equal(before[n], truth[n]) for n in truth) == 9  # 8 modules + lm_head


def test_trainer_deepspeed_checkpoint_kept_loads_in_peft(tmp_path: Path) -> None:
    from peft import PeftModel

    fixture = lora_deepspeed_fixture()
    out = tmp_path / "kept"
    assert _convert(fixture / "run" / "checkpoint-2", out, "--lora", "keep") == 0
    names = set(load_file(out / "adapter_model.safetensors"))
    assert "base_model.model.lm_head.weight" in names and not any(".default" in n for n in names)
    model = PeftModel.from_pretrained(build_tiny_qwen2(seed=TRAINED_SEED), out)
    state = model.merge_and_unload().state_dict()
    for name, value in load_file(fixture / "truth.safetensors").items():
        assert torch.equal(state[name], value), name
