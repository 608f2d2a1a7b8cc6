"""Reward and value models: a config naming a sequence- or token-classification model, or a
value-head model (trl's `...WithValueHead`, OpenRLHF's `CriticModel`/`RewardModel`), converts
with its head, checked against that model, and loads strictly as that model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from ckpt_core.families.value_head import build_value_head_model, value_head_rule
from ckptflow.cli import main
from tests.fixtures.tiny import sample_input_ids, tiny_qwen2_config


def _checkpoint(tmp_path: Path, state: dict[str, torch.Tensor], architecture: str) -> Path:
    """A trainer's `.pt` state dict with the config of the model it trained beside it."""
    config = tiny_qwen2_config()
    config.architectures = [architecture]
    config.num_labels = 1
    config.save_pretrained(tmp_path)
    torch.save(state, tmp_path / "trained.pt")
    return tmp_path / "trained.pt"


@pytest.mark.parametrize(
    ("architecture", "auto_class"),
    [
        ("Qwen2ForSequenceClassification", "AutoModelForSequenceClassification"),
        ("Qwen2ForTokenClassification", "AutoModelForTokenClassification"),
    ],
)
def test_classification_heads_are_carried_and_load_strictly(
    tmp_path: Path, architecture: str, auto_class: str
) -> None:
    config = tiny_qwen2_config()
    config.num_labels = 1
    torch.manual_seed(0)
    model = getattr(transformers, architecture)(config).eval()
    src = _checkpoint(tmp_path, model.state_dict(), architecture)
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--dtype", "fp32"]) == 0
    loaded, info = getattr(transformers, auto_class).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = sample_input_ids()[:1]  # a classifier pools at the last token: one unpadded row
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_a_causal_lm_checkpoint_is_refused_for_a_reward_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    lm = transformers.Qwen2ForCausalLM(tiny_qwen2_config())
    src = _checkpoint(tmp_path, lm.state_dict(), "Qwen2ForSequenceClassification")
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out)]) == 2
    assert not out.exists()


def _critic_state(head: str, bias: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    lm = transformers.Qwen2ForCausalLM(tiny_qwen2_config())
    state = {k: v for k, v in lm.state_dict().items() if k != "lm_head.weight"}
    state[f"{head}.weight"] = torch.randn(1, lm.config.hidden_size)
    if bias:
        state[f"{head}.bias"] = torch.randn(1)
    return state


@pytest.mark.parametrize(
    ("architecture", "head", "bias"),
    [
        ("CriticModel", "value_head", False),
        ("Qwen2ForCausalLMWithValueHead", "v_head.summary", True),
    ],
)
def test_value_head_models_convert_with_their_head(
    tmp_path: Path, architecture: str, head: str, bias: bool
) -> None:
    state = _critic_state(head, bias)
    src = _checkpoint(tmp_path, state, architecture)
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--dtype", "fp32"]) == 0
    config = transformers.AutoConfig.from_pretrained(out)
    rule = value_head_rule(architecture)
    assert rule is not None
    model = build_value_head_model(config, rule).to_empty(device="cpu")
    from safetensors.torch import load_file

    written = load_file(out / "model.safetensors")
    model.load_state_dict(written, strict=True)  # every key, nothing extra
    assert all(torch.equal(written[k], v) for k, v in state.items())
    # the backbone is the LM's: AutoModel loads it with no key left over but the head
    backbone, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"], info


def test_a_value_model_without_its_head_is_refused(tmp_path: Path) -> None:
    state = _critic_state("value_head", False)
    del state["value_head.weight"]
    src = _checkpoint(tmp_path, state, "CriticModel")
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out)]) == 2
    assert not out.exists()
