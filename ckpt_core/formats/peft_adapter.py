"""PEFT LoRA adapters: the `peft-adapter` format (`adapter_model.safetensors`/`.bin` beside
`adapter_config.json`, as `PeftModel.save_pretrained` writes it), the config as ckptflow uses
it (checked: only plain LoRA passes), and how adapter tensor names map onto the base model's.

The same names come from a Trainer + DeepSpeed + PEFT checkpoint, with the adapter's name in
them (`...q_proj.lora_A.default.weight`, `...lm_head.modules_to_save.default.weight`); a PEFT
adapter directory drops it (`...q_proj.lora_A.weight`, `...lm_head.weight`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ckpt_core.errors import AdapterError, clip
from ckpt_core.formats.hf import LAYOUTS, HFReader
from ckpt_core.formats.protocol import OpenOptions, TensorInfo
from ckpt_core.io.storage import Location

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_FILES",
    "ADAPTER_PREFIX",
    "FORMAT",
    "AdapterConfig",
    "AdapterLayout",
    "LoraMode",
    "LoraModule",
    "PeftAdapterFormat",
    "is_adapter_index",
    "layout_of",
    "read_adapter_config",
]

LoraMode = Literal["fuse", "keep"]  # --lora: fused into --base, or kept as a PEFT adapter dir

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_SAFETENSORS, "adapter_model.bin")
ADAPTER_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the base model

# (name part, optional adapter name): LoRA matrices of a Linear/Conv1D (`.weight`) or Embedding.
_LORA = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$"
)
_LORA_EMBEDDING = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)"
    r"(?:\.(?P<adapter>[^.]+))?$"
)
_SAVED_MODULE = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.modules_to_save\.(?P<adapter>[^.]+)\.(?P<param>[^.]+)$"
)
_ANY_LORA = re.compile(r"(^|\.)lora_")

# Config fields whose adapters are not `W + scale * B @ A` on the base ckptflow is given.
_REFUSED_FLAGS = {
    "use_dora": "DoRA (use_dora: true) rescales the merged weight by a learned magnitude",
    "lora_bias": "lora_bias: true trains a bias in lora_B",
    "use_qalora": "QALoRA (use_qalora: true)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens) cannot be merged",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "layer_replication": "layer_replication changes the base model's layers",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "ensure_weight_tying": "ensure_weight_tying ties adapters across modules",
    "megatron_config": "Megatron-parallel LoRA layers (megatron_config)",
    "kasa_config": "KaSA (kasa_config)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "arrow_config": "Arrow routing (arrow_config)",
}
# Other initialisations (PiSSA, OLoRA, CorDA, LoftQ...) may rewrite the base weights themselves.
_PLAIN_INITS = (True, False, "gaussian")


def read_adapter_config(directory: Location) -> dict[str, Any]:
    where = directory.file(ADAPTER_CONFIG)
    try:
        parsed = json.loads(directory.read_text(ADAPTER_CONFIG))
    except json.JSONDecodeError as e:
        raise AdapterError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(parsed, dict):
        raise AdapterError(f"{where}: not a JSON object")
    return parsed


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of a LoRA `adapter_config.json` that decide the merged weights."""

    where: str  # the file, for messages
    r: int
    lora_alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    target_modules: tuple[str, ...] = ()
    modules_to_save: tuple[str, ...] = ()

    @classmethod
    def parse(cls, raw: Mapping[str, Any], where: str) -> AdapterConfig:
        """The config, or `AdapterError` naming what ckptflow does not fuse and why."""
        peft_type = raw.get("peft_type")
        if peft_type != "LORA":
            raise AdapterError(
                f"{where}: peft_type {peft_type!r} is not LoRA; ckptflow fuses and keeps plain "
                "LoRA adapters only: merge this one with PEFT's merge_and_unload()"
            )
        for flag, what in _REFUSED_FLAGS.items():
            if raw.get(flag):
                raise AdapterError(
                    f"{where}: {what}: ckptflow fuses and keeps plain LoRA only; "
                    "merge this adapter with PEFT's merge_and_unload()"
                )
        init = raw.get("init_lora_weights", True)
        if init not in _PLAIN_INITS:
            raise AdapterError(
                f"{where}: init_lora_weights {init!r} may change the base weights themselves, "
                "so the adapter does not apply to the original base; merge it with PEFT"
            )
        if raw.get("bias", "none") != "none":
            raise AdapterError(
                f"{where}: bias {raw.get('bias')!r} trains base biases; ckptflow fuses and keeps "
                "LoRA adapters with bias 'none' only: merge this one with PEFT"
            )
        r, alpha = raw.get("r"), raw.get("lora_alpha")
        if not isinstance(r, int) or r <= 0 or not isinstance(alpha, int | float):
            raise AdapterError(f"{where}: r and lora_alpha must be a positive int and a number")
        targets = raw.get("target_modules") or ()
        return cls(
            where,
            r,
            alpha,
            bool(raw.get("use_rslora")),
            bool(raw.get("fan_in_fan_out")),
            dict(raw.get("rank_pattern") or {}),
            dict(raw.get("alpha_pattern") or {}),
            (targets,) if isinstance(targets, str) else tuple(targets),
            tuple(raw.get("modules_to_save") or ()),
        )

    def rank_and_scaling(self, module: str) -> tuple[int, float]:
        """As PEFT's LoraModel sets them for `module` (a name in the base model): patterns are
        regexes matched at the end of the name (peft.utils.other.get_pattern_key)."""
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.lora_alpha)
        return r, (alpha / math.sqrt(r) if self.use_rslora else alpha / r)


def _pattern_key(patterns: Iterable[str], module: str) -> str:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its base weight and the adapter's two matrices."""

    module: str  # in the base model, e.g. model.layers.0.self_attn.q_proj
    weight: str  # the base tensor it changes
    a: str  # adapter tensor names, as the reader has them
    b: str
    embedding: bool  # lora_embedding_A/B: delta transposed, A's dtype decides the cast


@dataclass(frozen=True)
class AdapterLayout:
    """Adapter tensors sorted by role: LoRA pairs, whole replacements, copies to ignore."""

    modules: dict[str, LoraModule]  # by base weight name
    replaced: dict[str, str]  # base tensor name -> adapter tensor replacing it
    adapter_name: str | None  # None in a PEFT adapter directory (names without it)


def is_adapter_index(names: Iterable[str]) -> bool:
    """Names a PeftModel's state dict has: LoRA matrices under `base_model.model.`."""
    return any(
        n.startswith(ADAPTER_PREFIX) and (_LORA.match(n) or _LORA_EMBEDDING.match(n)) for n in names
    )


def layout_of(index: Mapping[str, TensorInfo], where: str) -> AdapterLayout:
    """Every adapter tensor given a role, or `AdapterError` naming one that has none."""
    pairs: dict[str, dict[str, str]] = {}
    embedding: set[str] = set()
    replaced: dict[str, str] = {}
    adapters: set[str] = set()
    for name in index:
        lora = _LORA.match(name) or _LORA_EMBEDDING.match(name)
        if lora:
            module, part = lora["module"], lora["part"]
            if part.startswith("lora_embedding"):
                embedding.add(module)
            pairs.setdefault(module, {})[part[-1]] = name
            if lora["adapter"]:
                adapters.add(lora["adapter"])
            continue
        if not name.startswith(ADAPTER_PREFIX) or _ANY_LORA.search(name):
            raise AdapterError(
                f"{where}: adapter tensor {name!r} is not a LoRA matrix or a saved module; "
                "ckptflow fuses plain LoRA only: merge this adapter with PEFT"
            )
        if ".original_module." in name:
            continue  # the untouched base copy beside a module to save
        saved = _SAVED_MODULE.match(name)
        if saved:
            adapters.add(saved["adapter"])
            target = f"{saved['module']}.{saved['param']}"
        else:
            target = name.removeprefix(ADAPTER_PREFIX).replace(".base_layer.", ".")
        replaced[target] = name
    if len(adapters) > 1:
        raise AdapterError(f"{where}: several adapters ({clip(adapters)}); ckptflow takes one")
    modules: dict[str, LoraModule] = {}
    for module, parts in sorted(pairs.items()):
        if set(parts) != {"A", "B"}:
            missing = "B" if "A" in parts else "A"
            raise AdapterError(f"{where}: {module} has no lora_{missing}: the adapter is partial")
        weight = f"{module}.weight"
        modules[weight] = LoraModule(module, weight, parts["A"], parts["B"], module in embedding)
    return AdapterLayout(modules, replaced, next(iter(adapters), None))


class PeftAdapterFormat:
    """A PEFT adapter directory: its tensors under PEFT's names; `pipeline.lora` fuses them
    into `--base` or keeps them as an adapter."""

    name = "peft-adapter"

    def detect(self, root: Location) -> bool:
        names = set(root.listdir())
        return ADAPTER_CONFIG in names and bool(names & set(ADAPTER_FILES))

    def open(self, root: Location, options: OpenOptions) -> HFReader:
        names = set(root.listdir())
        for file, (_, index_name, tensors_of, kind) in zip(ADAPTER_FILES, LAYOUTS, strict=True):
            if file in names:
                return HFReader(root, [file], tensors_of, f"peft-adapter ({kind})", index_name)
        raise AdapterError(f"{root.url}: no {' or '.join(ADAPTER_FILES)} beside {ADAPTER_CONFIG}")


FORMAT = PeftAdapterFormat()
