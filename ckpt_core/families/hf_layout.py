"""The model a config describes, as the installed transformers holds it and saves it.

The model is built on the meta device (no memory). Its state dict is the in-memory layout
(what trainer checkpoints taken from memory hold: DeepSpeed, FSDP, DCP); `save_pretrained`'s
own steps (`remove_tied_weights_from_state_dict`, then `revert_weight_conversion`) are then
run on those meta tensors to learn the on-disk layout: names, shapes, and which slice of
which in-memory tensor each saved tensor is (fused MoE experts are written per expert).
Nothing here is a per-model table: transformers' own conversion mapping decides.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from ckpt_core.errors import ConfigError, KeyMismatchError
from ckpt_core.families.model_config import CONFIG, TIED_HEAD, transformers_config
from ckpt_core.families.value_head import build_value_head_model, value_head_rule

__all__ = [
    "ModelLayout",
    "Piece",
    "build_meta_model",
    "head_is_tied",
    "head_to_drop",
    "model_key_groups",
    "model_layout",
]


@dataclass(frozen=True)
class Piece:
    """A saved tensor as a strided view of one in-memory tensor (element units)."""

    source: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    @property
    def contiguous(self) -> bool:
        """Rows `offset .. offset + numel` of the source, in C order: a ranged read."""
        expected, step = [], 1
        for size in reversed(self.shape):
            expected.append(step)
            step *= size
        return all(
            s == e
            for s, e, n in zip(self.stride, reversed(expected), self.shape, strict=True)
            if n > 1
        )

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ModelLayout:
    model_type: str
    architecture: str
    memory: dict[str, tuple[int, ...]]  # in-memory state dict name -> shape
    saved: dict[str, Piece]  # what save_pretrained writes -> where it comes from in memory
    tied: dict[str, str]  # a tied name save_pretrained leaves out -> the saved name it repeats

    def renames(self) -> bool:
        """Whether any saved tensor is not an in-memory tensor under its own name."""
        return any(
            p.source != name or p.offset or not p.contiguous or self.memory[p.source] != p.shape
            for name, p in self.saved.items()
        )


def build_meta_model(config: Any) -> Any:
    """The model class the config names (its `architectures`), else the causal LM, seq2seq or
    base auto class that takes it, built on the meta device."""
    import transformers

    arch = next(iter(getattr(config, "architectures", None) or []), None)
    value_head = value_head_rule(arch)
    if value_head is not None:
        return build_value_head_model(config, value_head)
    classes = [getattr(transformers, arch, None)] if arch else []
    classes += [
        transformers.AutoModelForCausalLM,
        transformers.AutoModelForSeq2SeqLM,
        transformers.AutoModel,
    ]
    errors = []
    for cls in classes:
        if cls is None:
            continue
        try:
            with torch.device("meta"):
                build = cls.from_config if hasattr(cls, "from_config") else cls._from_config
                return build(config)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            errors.append(f"{getattr(cls, '__name__', cls)}: {e}")
    raise ConfigError(f"cannot build the model the config describes: {'; '.join(errors)}")


def model_key_groups(config: Any) -> list[list[str]]:
    """The in-memory model's state dict names, grouped by shared tensor (tied names together),
    in order (what a trainer's checkpoint holds before save_pretrained's renames)."""
    model = build_meta_model(config)
    groups: dict[int, list[str]] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(value), []).append(name)
    return list(groups.values())


def model_layout(config: Mapping[str, Any], where: str) -> ModelLayout:
    """The layout of the model `config` (a config.json dict) describes; cached per config."""
    return _layout(json.dumps(config, sort_keys=True, default=str), where)


@lru_cache(maxsize=8)
def _layout(config_json: str, where: str) -> ModelLayout:
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    model = build_meta_model(transformers_config(json.loads(config_json), where))
    live = model.state_dict(keep_vars=True)
    state = {n: t.detach() for n, t in live.items()}
    for name in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(name, None)
    kept = remove_tied_weights_from_state_dict(dict(state), model)
    roots = {_storage(t): n for n, t in kept.items()}
    with _views_only():
        reverted = revert_weight_conversion(model, kept)
    saved = {}
    for name, t in reverted.items():
        source = roots.get(_storage(t))
        if source is None:
            raise ConfigError(
                f"{where}: transformers saves {name} of {type(model).__name__} as a combination "
                "of several in-memory tensors, which ckptflow cannot lay out yet"
            )
        saved[name] = Piece(source, tuple(t.shape), tuple(t.stride()), t.storage_offset())
    by_source = {p.source: n for n, p in saved.items() if p.shape == tuple(kept[p.source].shape)}
    groups: dict[int, list[str]] = {}
    for name, t in live.items():
        groups.setdefault(id(t), []).append(name)
    tied = {}
    for group in groups.values():
        keep = [n for n in group if n in kept]
        for alias in group:
            if alias not in kept and keep and keep[0] in by_source:
                tied[alias] = by_source[keep[0]]
    return ModelLayout(
        str(getattr(model.config, "model_type", "")),
        type(model).__name__,
        {n: tuple(t.shape) for n, t in state.items()},
        saved,
        tied,
    )


def _storage(t: torch.Tensor) -> int:
    return int(t.untyped_storage()._cdata)


@contextmanager
def _views_only() -> Iterator[None]:
    """Copies (`contiguous()`, `clone()`) return views instead, so each reverted tensor stays a
    view of the in-memory tensor it comes from: its storage offset and strides say which slice."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    copies = {aten.clone.default, aten.contiguous.default, aten._to_copy.default}

    class ViewsOnly(TorchDispatchMode):  # type: ignore[no-untyped-call]
        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            if func in copies:
                x = args[0]
                return x.as_strided(x.shape, x.stride(), x.storage_offset())
            return func(*args, **(kwargs or {}))

    with ViewsOnly():  # type: ignore[no-untyped-call]
        yield


def head_is_tied(config: Mapping[str, Any], where: str = CONFIG) -> bool:
    """Whether the model the config describes ties its output head to the embeddings, as the
    model class declares it (the same tied groups the conversion's key check uses)."""
    return TIED_HEAD in model_layout(config, where).tied


def head_to_drop(
    names: Collection[str], *, tied: bool, where: str, head: str = TIED_HEAD
) -> str | None:
    """transformers does not save a tied output head, so a present one is left out (returned);
    an untied model must have one, or the output would load with a random head."""
    if tied:
        return head if head in names else None
    if head not in names and any(n.endswith("embed_tokens.weight") for n in names):
        raise KeyMismatchError(
            f"{where}: the config says tie_word_embeddings=false but the checkpoint has no "
            f"{head}; the output would load with a random head"
        )
    return None
