"""Trainer checkpoints (a model's in-memory state dict, saved as a DCP or a .pth) converted with
`--base`: the output holds exactly what the installed transformers' `save_pretrained` writes for
that model (fused MoE experts written per expert, tied groups once), loads strictly, and holds
the trained values. Sources that are not the model are refused before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open

from ckpt_core.errors import CkptError, KeyMismatchError
from ckpt_core.families.hf_layout import model_layout
from ckpt_core.pipeline.convert import ConvertOptions, convert
from ckpt_core.pipeline.modelcheck import key_mismatches

SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(SMALL),
    "gemma2": dict(SMALL, head_dim=8),
    "qwen2_moe": dict(
        SMALL,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=True,
    ),
    "mixtral": dict(SMALL, num_local_experts=4, num_experts_per_tok=2),
    "gpt2": dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "t5": dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
}


def build(model_type: str, seed: int = 0, **overrides: Any) -> Any:
    import transformers

    config = transformers.AutoConfig.for_model(model_type, **{**CONFIGS[model_type], **overrides})
    auto = (
        transformers.AutoModelForSeq2SeqLM
        if model_type == "t5"
        else transformers.AutoModelForCausalLM
    )
    torch.manual_seed(seed)
    model = auto.from_config(config)
    with torch.no_grad():  # distinct values everywhere, so a wrong slice or a swap shows
        for param in model.parameters():
            param.copy_(torch.randn_like(param))
    model.train(False)
    return model


def save_dcp(state: dict[str, torch.Tensor], where: Path) -> None:
    dcp.save({"model": {k: v.detach().clone() for k, v in state.items()}}, checkpoint_id=str(where))


def truth_dirs(model: Any, tmp: Path) -> tuple[Path, Path]:
    """`save_pretrained`'s output, and a base directory holding only its config.json."""
    truth, base = tmp / "truth", tmp / "base"
    model.save_pretrained(truth)
    base.mkdir()
    shutil.copy(truth / "config.json", base / "config.json")
    return truth, base


def layout_of(directory: Path) -> dict[str, tuple[int, ...]]:
    found: dict[str, tuple[int, ...]] = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as opened:
            for name in opened.keys():  # noqa: SIM118 (safe_open is not a mapping)
                found[name] = tuple(opened.get_slice(name).get_shape())
    return found


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
@pytest.mark.parametrize("saver", ["dcp", "pth"])
def test_trainer_state_dict_written_as_save_pretrained(
    model_type: str, saver: str, tmp_path: Path
) -> None:
    import transformers

    model = build(model_type)
    truth, base = truth_dirs(model, tmp_path)
    state = model.state_dict()
    src = tmp_path / "src"
    if saver == "dcp":
        save_dcp(state, src)
    else:
        src.mkdir()
        torch.save({k: v.clone() for k, v in state.items()}, src / "model.pth")
    out = tmp_path / "out"
    result = convert(str(src), str(out), ConvertOptions(dtype="fp32", base=str(base)))
    assert result.report is not None and result.report.verdict.startswith("OK")
    assert layout_of(out) == layout_of(truth)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["keys"].startswith("keys checked against")

    loaded, info = type(model).from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert isinstance(loaded, transformers.PreTrainedModel)
    got = loaded.state_dict()
    assert set(got) == set(state)
    for name, value in state.items():
        assert torch.equal(got[name], value), name


def test_fused_experts_are_read_by_ranges(tmp_path: Path) -> None:
    """Each per-expert tensor is a ranged read of the fused one, not a whole-tensor read."""
    from ckpt_core.pipeline.save_layout import SavedLayoutReader
    from ckpt_core.pipeline.source import open_source

    model = build("qwen2_moe")
    _, base = truth_dirs(model, tmp_path)
    save_dcp(model.state_dict(), tmp_path / "src")
    reader, _ = open_source(str(tmp_path / "src"), ConvertOptions(base=str(base)))
    assert isinstance(reader, SavedLayoutReader)
    fused = model.state_dict()["model.layers.1.mlp.experts.gate_up_proj"]
    up = reader.read_range("model.layers.1.mlp.experts.2.up_proj.weight", 3, 40)
    assert torch.equal(up, fused[2, 16:].reshape(-1)[3:43])
    assert "model.layers.1.mlp.experts.gate_up_proj" not in reader.index()


def refused(src: Path, tmp_path: Path, base: Path | None, *needles: str) -> str:
    out = tmp_path / "out"
    options = ConvertOptions(dtype="fp32", base=str(base) if base else None)
    with pytest.raises(CkptError) as caught:
        convert(str(src), str(out), options)
    message = str(caught.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message
    assert not out.exists() or not any(out.iterdir())
    return message


def test_qwen2_base_for_a_llama_checkpoint_is_refused(tmp_path: Path) -> None:
    qwen = build("llama").config.to_dict()
    qwen.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(qwen))
    save_dcp(build("llama").state_dict(), tmp_path / "src")
    refused(tmp_path / "src", tmp_path, base, "missing", "q_proj.bias", "Qwen2ForCausalLM")


def test_another_hidden_size_is_refused_on_shapes(tmp_path: Path) -> None:
    _, base = truth_dirs(build("llama", hidden_size=48), tmp_path)
    save_dcp(build("llama").state_dict(), tmp_path / "src")
    refused(tmp_path / "src", tmp_path, base, "shapes differ", "--base")


def test_optimizer_only_dcp_is_refused(tmp_path: Path) -> None:
    model = build("llama")
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long)).logits.sum().backward()
    optimizer.step()
    _, base = truth_dirs(model, tmp_path)
    dcp.save({"optimizer": optimizer.state_dict()}, checkpoint_id=str(tmp_path / "src"))
    refused(tmp_path / "src", tmp_path, base, "optim")


def test_adapter_only_checkpoint_is_refused(tmp_path: Path) -> None:
    model = build("llama")
    _, base = truth_dirs(model, tmp_path)
    lora = {
        f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.default.weight": (
            torch.randn(4, 32) if ab == "A" else torch.randn(32, 4)
        )
        for i in range(2)
        for ab in "AB"
    }
    save_dcp(lora, tmp_path / "src")
    refused(tmp_path / "src", tmp_path, base, "PEFT")  # the LoRA transform's or the check's line
    layout = model_layout(model.config.to_dict(), "config.json")
    with pytest.raises(KeyMismatchError, match=r"PEFT.*--base.*--lora"):
        key_mismatches({n: _info(n) for n in lora}, layout, where="src", config_at="base")


def test_optimizer_names_get_their_hint(tmp_path: Path) -> None:
    layout = model_layout(build("llama").config.to_dict(), "config.json")
    names = ["state.0.exp_avg", "state.0.exp_avg_sq", "state.0.step", "param_groups.0.lr"]
    index = {n: _info(n) for n in names}
    with pytest.raises(KeyMismatchError, match="optimizer state"):
        key_mismatches(index, layout, where="src", config_at="base")


def test_allow_missing_still_works(tmp_path: Path) -> None:
    model = build("llama")
    _, base = truth_dirs(model, tmp_path)
    state = {k: v for k, v in model.state_dict().items() if "layers.1.mlp" not in k}
    save_dcp(state, tmp_path / "src")
    refused(tmp_path / "src", tmp_path, base, "layers.1.mlp.down_proj.weight")
    options = ConvertOptions(dtype="fp32", base=str(base))
    options = ConvertOptions(
        dtype="fp32",
        base=str(base),
        open_options=type(options.open_options)(allow_missing=("*.layers.1.mlp.*",)),
    )
    result = convert(str(tmp_path / "src"), str(tmp_path / "out2"), options)
    assert result.report is not None and result.report.ok


def test_tied_copies_that_differ_are_refused(tmp_path: Path) -> None:
    model = build("gpt2")
    _, base = truth_dirs(model, tmp_path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    save_dcp(state, tmp_path / "src")
    refused(tmp_path / "src", tmp_path, base, "lm_head.weight", "tied")


def test_without_a_config_the_verdict_says_keys_not_checked(tmp_path: Path) -> None:
    save_dcp({"w": torch.randn(4, 4), "b": torch.randn(4)}, tmp_path / "src")
    result = convert(str(tmp_path / "src"), str(tmp_path / "out"), ConvertOptions(dtype="fp32"))
    assert result.report is not None and result.report.ok
    assert "keys not checked: no config" in result.report.verdict
    assert result.report.verdict != "OK: identical to the source"
    assert "keys not checked: no config" in result.report.text()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"]["keys"] == "keys not checked: no config"


def _info(name: str) -> Any:
    from ckpt_core.formats.protocol import TensorInfo

    return TensorInfo(name, torch.float32, (4,))
