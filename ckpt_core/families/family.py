"""A model family: per-architecture rules (key prefixes, parts, TP roles), declared as data.

A family says how an HF checkpoint's names split into parts (a VLM's vision tower and
language model), under every key layout transformers has used for it, and how each part's
tensors are cut across tensor-parallel ranks. Nothing here reads tensor data.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ckpt_core.errors import KeyMismatchError, clip
from ckpt_core.families.tp_roles import RoleTable

__all__ = ["Family", "Part", "Prefix"]


@dataclass(frozen=True)
class Part:
    name: str  # "vision" / "text"
    split_file: str  # file the split writes: "vision_model.pt"


@dataclass(frozen=True)
class Prefix:
    """HF names starting with `hf` belong to `part`, under the local prefix `local`."""

    hf: str
    part: str
    local: str = ""
    optional: bool = False  # e.g. lm_head, absent when tied


@dataclass(frozen=True, eq=False)
class Family:
    model_type: str
    model_class: str  # transformers class name, for the trainer and for tests
    parts: tuple[Part, ...]
    layouts: Mapping[str, tuple[Prefix, ...]]  # layout name -> ordered prefixes (first match)
    roles: Mapping[str, RoleTable]  # part -> role table over the part's local names
    # Builds a tiny model of this family, to find out which layout save_pretrained writes.
    tiny_model: Callable[[], Any] = field(compare=False)
    # A small synthetic training batch for a parsed config (the built-in demo trainer).
    demo_batch: Callable[[Any, int], dict[str, Any]] = field(compare=False)

    # -- names ---------------------------------------------------------------------------
    def _maps(self, layout: str, name: str) -> tuple[str, str] | None:
        for prefix in self.layouts[layout]:
            if name.startswith(prefix.hf):
                return prefix.part, prefix.local + name[len(prefix.hf) :]
        return None

    def detect_layout(self, names: Iterable[str], where: str) -> str:
        """The one layout under which every name maps and every required prefix is used."""
        listed = list(names)
        matching = []
        for layout, prefixes in self.layouts.items():
            if all(self._maps(layout, n) for n in listed) and all(
                p.optional or any(n.startswith(p.hf) for n in listed) for p in prefixes
            ):
                matching.append(layout)
        if len(matching) != 1:
            unmapped = [n for n in listed if not any(self._maps(lay, n) for lay in self.layouts)]
            raise KeyMismatchError(
                f"{where}: tensor names fit {'no' if not matching else 'more than one'} "
                f"{self.model_type} key layout (known: "
                + "; ".join(
                    f"{lay}: {', '.join(p.hf for p in ps)}" for lay, ps in self.layouts.items()
                )
                + ")"
                + (f"; names under no known prefix: {clip(unmapped)}" if unmapped else "")
            )
        return matching[0]

    def to_part(self, name: str, layout: str) -> tuple[str, str]:
        mapped = self._maps(layout, name)
        if mapped is None:
            raise KeyMismatchError(f"tensor {name!r} is under no {layout} {self.model_type} prefix")
        return mapped

    def to_hf(self, part: str, local: str, layout: str) -> str:
        # Longest local prefix first, so `lm_head.weight` goes back to `lm_head.` and not `model.`.
        candidates = sorted(
            (p for p in self.layouts[layout] if p.part == part and local.startswith(p.local)),
            key=lambda p: -len(p.local),
        )
        if not candidates:
            raise KeyMismatchError(f"no {layout} prefix for {part} tensor {local!r}")
        prefix = candidates[0]
        return prefix.hf + local[len(prefix.local) :]

    # -- config --------------------------------------------------------------------------
    def parsed_config(self, config: Mapping[str, Any]) -> Any:
        """The config as the installed transformers reads it (defaults filled in)."""
        from transformers import CONFIG_MAPPING

        return CONFIG_MAPPING[self.model_type].from_dict(dict(config))

    def vocab_size(self, config: Mapping[str, Any]) -> int:
        """Rows of the embedding and lm_head: the text config's vocab_size."""
        return int(self.parsed_config(config).get_text_config().vocab_size)

    def part_config(self, config: Mapping[str, Any], part: str) -> dict[str, Any]:
        parsed = self.parsed_config(config)
        sub = parsed.get_text_config() if part == "text" else getattr(parsed, f"{part}_config")
        return dict(sub.to_dict())

    # -- what the installed transformers writes -------------------------------------------
    def saved_layout(self) -> str:
        return _saved_layout(self)


_SAVED_LAYOUTS: dict[str, str] = {}


def _saved_layout(family: Family) -> str:
    """Save a tiny model with the installed transformers and read back its key names.

    transformers 4.52-4.57 saved the nested names, 5.x the legacy ones again: asking the
    library is the only way to match it without hard-coding versions.
    """
    import tempfile

    from safetensors import safe_open

    if family.model_type in _SAVED_LAYOUTS:
        return _SAVED_LAYOUTS[family.model_type]
    from transformers.utils import logging as hf_logging

    # The probe is an implementation detail: no progress bar on the user's terminal.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # unannotated upstream
    try:
        with tempfile.TemporaryDirectory(prefix="ckptflow-layout-") as tmp:
            family.tiny_model().save_pretrained(tmp)
            names = []
            for path in sorted(pathlib.Path(tmp).glob("*.safetensors")):
                with safe_open(str(path), "pt") as saved:
                    names.extend(saved.keys())
    finally:
        if bars:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
    layout = family.detect_layout(names, f"tiny {family.model_type} saved by transformers")
    _SAVED_LAYOUTS[family.model_type] = layout
    return layout
