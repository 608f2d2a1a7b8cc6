"""Tiny transformers models built from configs (no hub download), for the demo and the tests."""

from __future__ import annotations

from typing import Any

import torch


def tiny_qwen2_config(tie_word_embeddings: bool = False, **overrides: Any) -> Any:
    from transformers import Qwen2Config

    values: dict[str, Any] = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
    )
    values.update(overrides)
    return Qwen2Config(**values)


def build_tiny_qwen2(seed: int = 0, tie_word_embeddings: bool = False, **overrides: Any) -> Any:
    """A randomly initialised tiny Qwen2ForCausalLM in fp32, deterministic for a seed."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(tiny_qwen2_config(tie_word_embeddings, **overrides))
    # Non-trivial norm weights so a dropped or zeroed norm shows in the logits.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.train(False)  # eval mode; `eval()` is untyped in transformers' stubs
    return model


def sample_input_ids(vocab_size: int = 320, length: int = 12, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (2, length), generator=generator)
