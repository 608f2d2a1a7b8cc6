"""Qwen2.5-VL: vision tower (`visual`) and language model, both key layouts, TP roles.

Layouts: transformers >= 4.52 names the modules `model.visual.*` and
`model.language_model.*` (and 4.52-4.57 saved those names); older releases, and 5.x on
disk again, use `visual.*` and `model.*`. `lm_head.weight` is top level in both and goes
with the text part; it is absent from the files when the embeddings are tied.
"""

from __future__ import annotations

from typing import Any

from ckpt_core.families.family import Family, Part, Prefix
from ckpt_core.families.tp_roles import (
    COLUMN,
    FUSED_QKV,
    REPLICATED,
    ROW,
    VOCAB,
    Role,
    RoleTable,
    weight_and_bias,
)

__all__ = ["FAMILY", "LM_HEAD", "TEXT_ROLES", "VISION_ROLES", "demo_batch", "tiny_model"]

_BLOCK = r"blocks\.\d+\."
_LAYER = r"layers\.\d+\."


def _rules(*groups: list[tuple[str, Role]]) -> tuple[tuple[str, Role], ...]:
    return tuple(rule for group in groups for rule in group)


VISION_ROLES = RoleTable(
    "vision",
    _rules(
        weight_and_bias(_BLOCK + r"attn\.qkv", FUSED_QKV),  # [q_r; k_r; v_r] per rank
        weight_and_bias(_BLOCK + r"attn\.proj", ROW),
        weight_and_bias(_BLOCK + r"mlp\.(gate_proj|up_proj)", COLUMN),
        weight_and_bias(_BLOCK + r"mlp\.down_proj", ROW),
        weight_and_bias(_BLOCK + r"norm[12]", REPLICATED),
        weight_and_bias(r"patch_embed\.proj", REPLICATED),
        weight_and_bias(r"merger\.ln_q", REPLICATED),
        weight_and_bias(r"merger\.mlp\.0", COLUMN),
        weight_and_bias(r"merger\.mlp\.2", ROW),
    ),
)

TEXT_ROLES = RoleTable(
    "text",
    _rules(
        [(r"embed_tokens\.weight", VOCAB), (r"lm_head\.weight", VOCAB)],
        weight_and_bias(_LAYER + r"self_attn\.(q_proj|k_proj|v_proj)", COLUMN),
        weight_and_bias(_LAYER + r"self_attn\.o_proj", ROW),
        weight_and_bias(_LAYER + r"mlp\.(gate_proj|up_proj)", COLUMN),
        weight_and_bias(_LAYER + r"mlp\.down_proj", ROW),
        weight_and_bias(_LAYER + r"(input_layernorm|post_attention_layernorm)", REPLICATED),
        weight_and_bias(r"norm", REPLICATED),
    ),
)

LM_HEAD = Prefix("lm_head.", "text", "lm_head.", optional=True)


def tiny_model() -> Any:
    """The smallest model transformers will build: only its saved key names are used."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=1, hidden_size=8, intermediate_size=8, num_heads=1, out_hidden_size=8
        ),
        text_config=dict(
            # Every size 8, every count 1.
            **dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size"), 8),
            **dict.fromkeys(("num_hidden_layers", "num_attention_heads", "num_key_value_heads"), 1),
            bos_token_id=0,
            eos_token_id=1,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
        ),
        tie_word_embeddings=False,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def demo_batch(config: Any, seed: int) -> dict[str, Any]:
    """Two sequences, each with one 4x4-patch image and text, labels on the text only."""
    import torch

    vision = config.vision_config
    generator = torch.Generator().manual_seed(seed)
    grid = torch.tensor([[1, 4, 4], [1, 4, 4]])
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    pixels = torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=generator)
    image_tokens = 16 // vision.spatial_merge_size**2
    vocab = config.get_text_config().vocab_size
    rows = []
    for _ in range(2):
        text = torch.randint(8, vocab, (10,), generator=generator)
        image = [config.vision_start_token_id] + [config.image_token_id] * image_tokens
        rows.append(torch.cat([torch.tensor([*image, config.vision_end_token_id]), text]))
    input_ids = torch.stack(rows)
    labels = input_ids.clone()
    labels[:, : image_tokens + 2] = -100
    return {
        "input_ids": input_ids,
        "pixel_values": pixels,
        "image_grid_thw": grid,
        "labels": labels,
    }


FAMILY = Family(
    model_type="qwen2_5_vl",
    model_class="Qwen2_5_VLForConditionalGeneration",
    parts=(Part("vision", "vision_model.pt"), Part("text", "text_model.pt")),
    layouts={
        "nested": (
            LM_HEAD,
            Prefix("model.visual.", "vision"),
            Prefix("model.language_model.", "text"),
        ),
        "legacy": (LM_HEAD, Prefix("visual.", "vision"), Prefix("model.", "text")),
    },
    roles={"vision": VISION_ROLES, "text": TEXT_ROLES},
    tiny_model=tiny_model,
    demo_batch=demo_batch,
)
