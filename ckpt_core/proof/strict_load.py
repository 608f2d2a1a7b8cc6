"""A strict load, on the meta device: the output's tensor names and shapes against the model
the config's `architectures` names, as the installed transformers builds and saves it
(`families.hf_layout`: tied weights, renames). No weight is read, so a 70B model's check needs
no more memory than a tiny one's. Missing, unexpected and wrongly shaped keys are what
`from_pretrained` would report for this directory."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from ckpt_core.families.hf_layout import ModelLayout, model_layout
from ckpt_core.formats.protocol import TensorInfo
from ckpt_core.proof.report import Failure

__all__ = ["AUTO_CLASSES", "KeysCheck", "auto_class", "check_keys"]

# The auto classes `verify` and `test-model` load through, by the mapping that names the
# config's architecture.
AUTO_CLASSES = (
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForImageTextToText", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
)


@dataclass(frozen=True)
class KeysCheck:
    failures: list[Failure]
    layout: ModelLayout
    auto: str  # the auto class that takes the architecture ("" when none of AUTO_CLASSES)

    @property
    def detail(self) -> str:
        via = f" via {self.auto}" if self.auto else ""
        return f"{self.layout.architecture}{via} on meta: no missing or unexpected keys"


def auto_class(architecture: str) -> str:
    """The auto class whose mapping lists `architecture`, else ""."""
    from transformers.models.auto import modeling_auto

    for auto, mapping in AUTO_CLASSES:
        if architecture in _names(getattr(modeling_auto, mapping)):
            return auto
    return ""


def _names(mapping: Mapping[str, Any]) -> set[str]:
    found: set[str] = set()
    for value in mapping.values():
        found.update([value] if isinstance(value, str) else value)
    return found


def check_keys(
    index: Mapping[str, TensorInfo],
    config: Mapping[str, Any],
    *,
    config_at: str,
    files_of: Mapping[str, str],
    index_file: str = "",
    unreadable: Collection[str] = (),
) -> KeysCheck:
    """`index_file`: what a missing tensor's failure names (the index that should list it);
    `unreadable`: indexed tensors whose file is broken (reported there, not as missing)."""
    layout = model_layout(config, config_at)
    model = layout.architecture

    def at(name: str) -> str:
        return files_of.get(name, "")

    failures = [
        Failure("keys", index_file, name, f"missing: {model} has it and would load it random")
        for name in layout.saved
        if name not in index and name not in unreadable
    ]
    failures += [
        Failure("keys", at(name), name, f"unexpected: {model} has no such weight")
        for name in index
        if name not in layout.saved and name not in layout.tied
    ]
    failures += [
        Failure(
            "keys",
            at(name),
            name,
            f"shape {list(index[name].shape)}, {model} expects {list(p.shape)}",
        )
        for name, p in layout.saved.items()
        if name in index and tuple(index[name].shape) != p.shape
    ]
    return KeysCheck(failures, layout, auto_class(layout.architecture))
