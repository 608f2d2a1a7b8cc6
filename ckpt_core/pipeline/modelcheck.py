"""Every source, checked against the model its config describes before anything is written.

The conversion's reader (after every source transform) must hold exactly the tensors the
installed transformers' `save_pretrained` writes for that model (`families.hf_layout`): the
same names and the same shapes. A tied group is satisfied by the member save_pretrained keeps;
other members present are left out of the output once they are found equal to it. Without a
config nothing can be checked: the output is still written, and says so.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from ckpt_core.errors import KeyMismatchError, clip
from ckpt_core.families.hf_layout import ModelLayout, model_layout
from ckpt_core.formats.protocol import Reader, TensorInfo
from ckpt_core.pipeline.save_layout import config_where
from ckpt_core.pipeline.stream import source_chunks
from ckpt_core.pipeline.verify import same_bytes

if TYPE_CHECKING:
    from ckpt_core.pipeline.source import Source

__all__ = ["NOT_CHECKED", "ModelCheck", "check_model", "key_mismatches"]

NOT_CHECKED = "keys not checked: no config"

_OPTIMIZER = re.compile(r"(^|\.)(state|param_groups|optimizer|optim)(\.|$)|exp_avg")
_ADAPTER = re.compile(r"(^|\.)lora_[AB](\.|$)|lora_embedding_[AB]")


@dataclass(frozen=True)
class ModelCheck:
    dropped: tuple[str, ...]  # tied copies left out of the output
    keys: str  # what the report and the manifest say about the keys


def check_model(reader: Reader, source: Source, *, where: str) -> ModelCheck:
    """Raise `KeyMismatchError` (one line) unless the reader holds the model's tensors."""
    if source.config is None:
        return ModelCheck((), NOT_CHECKED)
    config_at = config_where(source)
    layout = model_layout(source.config, config_at)
    index = reader.index()
    opened = source.options.open_options
    # --exclude-frozen leaves parameters out on purpose: the output says it is partial.
    allow = ("*",) if opened.exclude_frozen else opened.allow_missing
    drop = key_mismatches(index, layout, allow, where=where, config_at=config_at)
    for alias, kept in drop.items():
        _check_tied_equal(reader, index, alias, kept, where=where)
    return ModelCheck(tuple(sorted(drop)), f"keys checked against {layout.architecture}")


def key_mismatches(
    index: Mapping[str, TensorInfo],
    layout: ModelLayout,
    allow_missing: Sequence[str] = (),
    *,
    where: str,
    config_at: str,
) -> dict[str, str]:
    """{tied copy present: the saved name it repeats}; raises on missing, unexpected or
    wrongly shaped tensors, with a hint for the usual causes."""
    have = set(index)
    expected = {n: p.shape for n, p in layout.saved.items()}
    drop = {a: k for a, k in layout.tied.items() if a in have and k in have}
    missing = [
        n for n in expected if n not in have and not any(fnmatchcase(n, p) for p in allow_missing)
    ]
    unexpected = sorted(have - set(expected) - set(drop))
    model = f"{layout.architecture} ({layout.model_type}) from {config_at}"
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {clip(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {clip(unexpected)}")
        raise KeyMismatchError(
            f"{where}: tensors do not match the model {model} ({'; '.join(parts)}); "
            + _hint(have, unexpected, expected, missing)
        )
    shapes = [
        f"{n} {list(index[n].shape)} (model: {list(s)})"
        for n, s in expected.items()
        if n in have and tuple(index[n].shape) != s
    ]
    if shapes:
        raise KeyMismatchError(
            f"{where}: tensor shapes differ from the model {model}: {clip(shapes, 5)}; "
            "check --base: it describes another size of model than the one trained"
        )
    return drop


def _hint(
    have: set[str], unexpected: list[str], expected: Mapping[str, object], missing: list[str]
) -> str:
    if unexpected and sum(bool(_OPTIMIZER.search(n)) for n in unexpected) * 2 >= len(unexpected):
        return (
            "these look like optimizer state (state.*, param_groups, exp_avg), not model "
            "weights: point at the model's checkpoint (e.g. pytorch_model_fsdp_0, not optimizer_0)"
        )
    if any(_ADAPTER.search(n) for n in unexpected):
        return (
            "this is an adapter-only (PEFT LoRA) checkpoint: pass the base model with --base "
            "and the adapter with --lora to write the merged model"
        )
    matched = len(have & set(expected))
    if matched * 2 < max(len(have), 1) or matched * 2 < len(expected):
        return (
            f"only {matched} of the checkpoint's {len(have)} names are the model's: check "
            "--base (the HF model the checkpoint was trained from: same architecture and size)"
        )
    return "check --base, or pass --allow-missing PATTERN for tensors meant to be absent"


def _check_tied_equal(
    reader: Reader, index: Mapping[str, TensorInfo], alias: str, kept: str, *, where: str
) -> None:
    """A tied copy is only left out when it is the same tensor (read in bounded chunks)."""
    a, b = index[alias], index[kept]
    same = a.shape == b.shape and a.dtype == b.dtype
    if same:
        chunks = zip(
            source_chunks(reader, a, a.dtype), source_chunks(reader, b, b.dtype), strict=True
        )
        for x, y in chunks:
            if not same_bytes(x, y):
                same = False
                break
    if not same:
        raise KeyMismatchError(
            f"{where}: {alias} and {kept} are tied in the model config but differ in the "
            "checkpoint; use a config that unties them (e.g. tie_word_embeddings=false in --base)"
        )
