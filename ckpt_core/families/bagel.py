"""BAGEL-style multi-model checkpoints (ByteDance-Seed/Bagel): rules as data.

A training step directory holds two models of one architecture, the trained weights (`main`)
and their exponential moving average (`ema`); a release directory mirrors the base model:
`model.safetensors`, `ema.safetensors`, the VAE `ae.safetensors` and the config/tokenizer files.
A BAGEL base has no transformers architecture (its `config.json` names none), so the model
the base describes is its own weight files: their headers are the truth for names and shapes.

Readers expose every model's tensors under `<model>/<name>`; the plan maps each model to its
own files (`OUTPUTS`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch

__all__ = [
    "COPIED_WEIGHTS",
    "MODELS",
    "OUTPUTS",
    "PATCH_EMBEDDINGS",
    "QK_NORM",
    "ModelOutput",
    "conv_to_linear",
    "has_qk_norm",
    "linear_to_conv",
    "model_name",
    "patch_reshape",
    "split_model_name",
]

MODELS = ("main", "ema")  # in output order


@dataclass(frozen=True)
class ModelOutput:
    """Where one model goes in the release directory, and which base files describe it."""

    pattern: str  # weight files, as plan_shards takes them
    index: str  # its own index file when sharded
    truth: tuple[str, ...]  # base weight files (stems) whose headers are the model, best first


OUTPUTS: Mapping[str, ModelOutput] = {
    "main": ModelOutput(
        "model{suffix}.safetensors", "model.safetensors.index.json", ("model", "ema")
    ),
    "ema": ModelOutput("ema{suffix}.safetensors", "ema.safetensors.index.json", ("ema", "model")),
}
# Weight files of the base copied as they are (the VAE is not trained in these runs).
COPIED_WEIGHTS = ("ae.safetensors",)

# NaViT/SigLIP patch embedding: training stores it as Linear [O, kh*kw*C], the original model
# (and the released base) as Conv2d [O, C, kh, kw].
PATCH_EMBEDDINGS = ("*patch_embedding.weight",)
# Per-head RMSNorm on q and k, in the understanding and the generation (`_moe_gen`) experts.
QK_NORM = re.compile(r"\.self_attn\.[qk]_norm(_moe_gen)?\.weight$")

_SEPARATOR = "/"


def model_name(model: str, name: str) -> str:
    """The reader's name of `name` in `model` (main/ema)."""
    return f"{model}{_SEPARATOR}{name}"


def split_model_name(name: str) -> tuple[str, str]:
    model, _, rest = name.partition(_SEPARATOR)
    return model, rest


def has_qk_norm(names: Iterable[str]) -> bool:
    """Whether the model was built with qk_norm, read from its keys (not from a flag)."""
    return any(QK_NORM.search(n) for n in names)


def patch_reshape(name: str, shape: tuple[int, ...], base_shape: tuple[int, ...]) -> str | None:
    """ "to_conv" / "to_linear" when `name` is a patch embedding stored in the other form than
    the base's (same element count, conv channels and kernel taken from the base); else None."""
    if not any(fnmatchcase(name, p) for p in PATCH_EMBEDDINGS) or shape == base_shape:
        return None
    if len(shape) == 2 and len(base_shape) == 4:
        out, c, kh, kw = base_shape
        return "to_conv" if shape == (out, c * kh * kw) else None
    if len(shape) == 4 and len(base_shape) == 2:
        out, c, kh, kw = shape
        return "to_linear" if base_shape == (out, c * kh * kw) else None
    return None


def linear_to_conv(weight: torch.Tensor, conv_shape: tuple[int, ...]) -> torch.Tensor:
    """[O, kh*kw*C] (patches flattened as (kh, kw, C)) -> [O, C, kh, kw]."""
    out, c, kh, kw = conv_shape
    return weight.reshape(out, kh, kw, c).permute(0, 3, 1, 2).contiguous()


def conv_to_linear(weight: torch.Tensor) -> torch.Tensor:
    """[O, C, kh, kw] -> [O, kh*kw*C], as BAGEL's training code flattens patches."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).contiguous()
