"""Megatron-core GPT models as HF Llama-family models: the name rules, as data, and the plan that
turns a checkpoint's stacked tensors into HF tensors, each a list of row blocks of one source.

Megatron stacks the layers of a `torch_dist` checkpoint on a leading `[L, ...]` dimension, fuses
q/k/v per query group (`[q (heads/groups * head_dim rows), k, v]` per group, the bias alike) and
gate/up (`linear_fc1` is `[gate; up]`), and pads the vocabulary. Every HF tensor here is a
concatenation of row blocks of one source tensor (`Block`), so a reader streams it block by
block without ever holding the stacked tensor. Nothing here reads tensor data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ckpt_core.errors import ConfigError, FormatError, clip

__all__ = ["MODEL_TYPES", "Block", "GptShape", "Piece", "plan_pieces", "shape_from_config"]

# HF model types whose decoder uses the Llama names below (Qwen3 adds q_norm/k_norm).
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

_LAYER = "model.layers.{i}."
_STACKED = "decoder.layers."
# Megatron name -> HF name, for tensors copied as they are (a layer slice or the whole tensor).
DIRECT: Mapping[str, str] = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
    # Fused into the linear that follows them (TE / local spec), or separate modules.
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight": _LAYER + "input_layernorm.weight",
    "decoder.layers.input_layernorm.weight": _LAYER + "input_layernorm.weight",
    "decoder.layers.mlp.linear_fc1.layer_norm_weight": _LAYER + "post_attention_layernorm.weight",
    "decoder.layers.pre_mlp_layernorm.weight": _LAYER + "post_attention_layernorm.weight",
    "decoder.layers.self_attention.linear_proj.weight": _LAYER + "self_attn.o_proj.weight",
    "decoder.layers.self_attention.q_layernorm.weight": _LAYER + "self_attn.q_norm.weight",
    "decoder.layers.self_attention.k_layernorm.weight": _LAYER + "self_attn.k_norm.weight",
    "decoder.layers.mlp.linear_fc2.weight": _LAYER + "mlp.down_proj.weight",
}
# Fused q/k/v, split per query group.
QKV: Mapping[str, str] = {
    "decoder.layers.self_attention.linear_qkv.weight": _LAYER + "self_attn.{p}_proj.weight",
    "decoder.layers.self_attention.linear_qkv.bias": _LAYER + "self_attn.{p}_proj.bias",
}
# Fused gate/up: `[gate; up]`, split in two.
GATE_UP: Mapping[str, str] = {
    "decoder.layers.mlp.linear_fc1.weight": _LAYER + "mlp.{p}_proj.weight",
}
VOCAB = ("embedding.word_embeddings.weight", "output_layer.weight")  # padded rows trimmed
# What is not supported yet, by the names that show it.
UNSUPPORTED = (
    (".mlp.experts.", "MoE experts (decoder.layers.mlp.experts.*)"),
    (".mlp.router.", "MoE router (decoder.layers.mlp.router.*)"),
    (".mlp.shared_experts.", "MoE shared experts"),
    ("linear_q_down_proj", "multi-latent attention (MLA)"),
    ("linear_kv_down_proj", "multi-latent attention (MLA)"),
    ("mtp.", "multi-token prediction layers (mtp.*)"),
    ("embedding.position_embeddings", "learned absolute position embeddings (not RoPE)"),
    ("linear_qkv.layer_norm_bias", "LayerNorm with a bias (not RMSNorm)"),
    ("final_layernorm.bias", "LayerNorm with a bias (not RMSNorm)"),
    ("linear_fc1.bias", "MLP biases"),
    ("linear_fc2.bias", "MLP biases"),
    ("linear_proj.bias", "an attention output bias"),
)


@dataclass(frozen=True)
class GptShape:
    """The sizes of the HF model `--base` describes."""

    model_type: str
    layers: int
    hidden: int
    heads: int
    groups: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool


@dataclass(frozen=True)
class Block:
    """Rows [row, row+rows) of `source` at the leading indices `at` (the layer, or none)."""

    source: str
    at: tuple[int, ...]
    row: int
    rows: int


@dataclass(frozen=True)
class Piece:
    """An HF tensor: its shape and the row blocks it is the concatenation of."""

    shape: tuple[int, ...]
    blocks: tuple[Block, ...]


def shape_from_config(config: Any, where: str) -> GptShape:
    """The sizes from a transformers config (its defaults filled in)."""
    model_type = str(getattr(config, "model_type", ""))
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            f"{where}: model_type {model_type!r} has no Megatron GPT rules; known: "
            f"{', '.join(MODEL_TYPES)}"
        )
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return GptShape(
        model_type=model_type,
        layers=int(config.num_hidden_layers),
        hidden=int(config.hidden_size),
        heads=heads,
        groups=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=int(head_dim),
        intermediate=int(config.intermediate_size),
        vocab=int(config.vocab_size),
        tied=bool(getattr(config, "tie_word_embeddings", False)),
    )


def plan_pieces(
    shapes: Mapping[str, tuple[int, ...]], model: GptShape, *, where: str, base: str
) -> dict[str, Piece]:
    """HF name -> Piece for every model tensor of the checkpoint (`shapes`: Megatron name ->
    global shape), after checking the checkpoint against `model`; raises one line naming the
    first disagreement."""
    for marker, what in UNSUPPORTED:
        found = [n for n in shapes if marker in n]
        if found:
            raise FormatError(
                f"{where}: {what} not supported yet for Megatron checkpoints ({clip(found)})"
            )
    unknown = [n for n in shapes if n not in DIRECT and n not in QKV and n not in GATE_UP]
    if unknown:
        raise FormatError(
            f"{where}: Megatron tensors without a GPT rule (not supported yet): {clip(unknown)}"
        )
    _check(shapes, model, where=where, base=base)
    pieces: dict[str, Piece] = {}
    for name, shape in shapes.items():
        layers = range(shape[0]) if name.startswith(_STACKED) else (None,)
        for layer in layers:
            pieces.update(_pieces_of(name, shape, layer, model))
    return dict(sorted(pieces.items(), key=lambda item: _order(item[0])))


def _pieces_of(
    name: str, shape: tuple[int, ...], layer: int | None, model: GptShape
) -> dict[str, Piece]:
    at = () if layer is None else (layer,)
    inner = shape[len(at) :]
    trailing = inner[1:]
    if name in QKV:
        per_group = model.heads // model.groups * model.head_dim
        stride = per_group + 2 * model.head_dim
        template = QKV[name]
        spans = {"q": (0, per_group), "k": (per_group, model.head_dim)}
        spans["v"] = (per_group + model.head_dim, model.head_dim)
        out = {}
        for proj, (first, rows) in spans.items():
            blocks = tuple(Block(name, at, g * stride + first, rows) for g in range(model.groups))
            out[template.format(i=layer, p=proj)] = Piece((rows * model.groups, *trailing), blocks)
        return out
    if name in GATE_UP:
        half = inner[0] // 2
        return {
            GATE_UP[name].format(i=layer, p=proj): Piece(
                (half, *trailing), (Block(name, at, k * half, half),)
            )
            for k, proj in enumerate(("gate", "up"))
        }
    rows = model.vocab if name in VOCAB else (inner[0] if inner else 1)
    target = DIRECT[name].format(i=layer)
    return {target: Piece((rows, *trailing) if inner else (), (Block(name, at, 0, rows),))}


def _order(name: str) -> tuple[int, int, str]:
    """Embedding, layers in order, then the final norm and head (as HF models list them)."""
    if name.startswith("model.layers."):
        return (1, int(name.split(".")[2]), name)
    return (0 if "embed_tokens" in name else 2, 0, name)


def _check(
    shapes: Mapping[str, tuple[int, ...]], model: GptShape, *, where: str, base: str
) -> None:
    """Every size the checkpoint shows agrees with the config (before anything is written)."""
    q_rows = model.heads * model.head_dim
    qkv_rows = (model.heads + 2 * model.groups) * model.head_dim
    expect: dict[str, tuple[tuple[int, ...], str]] = {
        "decoder.final_layernorm.weight": ((model.hidden,), "hidden_size"),
        "decoder.layers.self_attention.linear_proj.weight": (
            (model.layers, model.hidden, q_rows),
            "num_hidden_layers, hidden_size, num_attention_heads * head_dim",
        ),
        "decoder.layers.self_attention.linear_qkv.weight": (
            (model.layers, qkv_rows, model.hidden),
            "(num_attention_heads + 2 * num_key_value_heads) * head_dim rows",
        ),
        "decoder.layers.self_attention.linear_qkv.bias": ((model.layers, qkv_rows), "heads"),
        "decoder.layers.self_attention.q_layernorm.weight": (
            (model.layers, model.head_dim),
            "head_dim",
        ),
        "decoder.layers.self_attention.k_layernorm.weight": (
            (model.layers, model.head_dim),
            "head_dim",
        ),
        "decoder.layers.mlp.linear_fc1.weight": (
            (model.layers, 2 * model.intermediate, model.hidden),
            "2 * intermediate_size (gated MLP), hidden_size",
        ),
        "decoder.layers.mlp.linear_fc2.weight": (
            (model.layers, model.hidden, model.intermediate),
            "hidden_size, intermediate_size",
        ),
    }
    for name in DIRECT:
        if name.endswith(("layer_norm_weight", "layernorm.weight")) and name.startswith(_STACKED):
            expect.setdefault(name, ((model.layers, model.hidden), "hidden_size"))
    for name, (want, fields) in expect.items():
        have = shapes.get(name)
        if have is not None and tuple(have) != want:
            raise ConfigError(
                f"{where}: {name} is {list(have)} but {base} describes {list(want)} ({fields}: "
                f"{model.heads} heads, {model.groups} kv heads, head_dim {model.head_dim}, "
                f"hidden {model.hidden}, {model.layers} layers, intermediate "
                f"{model.intermediate}); pass the --base the model was trained from"
            )
    for name in VOCAB:
        have = shapes.get(name)
        if have is not None and (have[0] < model.vocab or tuple(have[1:]) != (model.hidden,)):
            raise ConfigError(
                f"{where}: {name} is {list(have)}, fewer rows than vocab_size {model.vocab} or "
                f"not hidden_size {model.hidden} wide ({base}); pass the --base it was trained from"
            )
    for name in (
        "embedding.word_embeddings.weight",
        "decoder.layers.self_attention.linear_qkv.weight",
    ):
        if name not in shapes:
            raise FormatError(f"{where}: no {name}: not a Megatron GPT model checkpoint")
    has_head = "output_layer.weight" in shapes
    if has_head == model.tied:
        state = "has its own output_layer" if has_head else "ties the output layer to the embedding"
        raise ConfigError(
            f"{where}: the checkpoint {state} but {base} says tie_word_embeddings="
            f"{str(model.tied).lower()}; pass the --base the model was trained from"
        )
