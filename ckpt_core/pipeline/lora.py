"""LoRA as a source transform: an adapter (a PEFT adapter directory, or a Trainer + DeepSpeed +
PEFT checkpoint with `adapter_config.json` beside it) fused into `--base` the way PEFT's
`merge_and_unload()` does it (`--lora fuse`), or kept as a clean PEFT adapter directory
(`--lora keep`).

Fused, the output has the base's tensors: each adapted weight is `W + delta` (PEFT's
`get_delta_weight`, in PEFT's dtype order), each module to save replaces the base's tensor,
every other tensor streams from the base by byte range. One fused weight is in memory per
stream at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from ckpt_core.dtypes import output_dtype, parse_target
from ckpt_core.errors import AdapterError, UsageError
from ckpt_core.formats.peft_adapter import (
    ADAPTER_CONFIG,
    ADAPTER_PREFIX,
    ADAPTER_SAFETENSORS,
    AdapterConfig,
    AdapterLayout,
    LoraModule,
    is_adapter_index,
    layout_of,
    read_adapter_config,
)
from ckpt_core.formats.protocol import Reader, SourceFacts, TensorInfo, lookup
from ckpt_core.formats.registry import open_reader
from ckpt_core.io.storage import Location
from ckpt_core.pipeline.assets import AssetSource, find_assets
from ckpt_core.pipeline.plan import SAFETENSORS_PATTERN
from ckpt_core.pipeline.stream import RangeReader

if TYPE_CHECKING:  # source.py lists this module's transform
    from ckpt_core.pipeline.source import Source

__all__ = [
    "ADAPTER_PATTERN",
    "FusedReader",
    "KeptAdapterReader",
    "OutputFiles",
    "lora_transform",
    "output_files",
]

ADAPTER_PATTERN = ADAPTER_SAFETENSORS.replace(".safetensors", "{suffix}.safetensors")


def _adapter_config_dir(reader: Reader) -> Location | None:
    """Where the source's adapter_config.json is: found, not gathered as an output asset."""
    for directory in reader.asset_dirs():
        if directory.isdir() and ADAPTER_CONFIG in directory.listdir():
            return directory
    return None


def lora_transform(reader: Reader, source: Source) -> Reader:
    """The adapter fused into `--base` (or kept); any other source is returned as it is."""
    index = reader.index()
    if not is_adapter_index(index):
        return reader
    where_dir = _adapter_config_dir(reader)
    if where_dir is None:
        raise AdapterError(
            f"{reader.root.url}: the tensors are a PEFT LoRA adapter's but no {ADAPTER_CONFIG} "
            "is beside them (r, lora_alpha decide the fused weights): put the adapter's config there"
        )
    where = where_dir.file(ADAPTER_CONFIG)
    raw = read_adapter_config(where_dir)
    config = AdapterConfig.parse(raw, where)
    layout = layout_of(index, reader.root.url)
    if source.options.lora == "keep":
        return KeptAdapterReader(reader, layout, AssetSource(ADAPTER_CONFIG, where_dir.url))
    if not source.options.base:
        raise UsageError(
            f"{reader.root.url}: a PEFT LoRA adapter ({len(layout.modules)} adapted modules) is "
            "not a model by itself: pass --base DIR (the HF model it was trained on) to fuse it, "
            "or --lora keep to write it as a PEFT adapter directory"
        )
    base = open_reader(source.options.base)
    return FusedReader(reader, base, config, layout, parse_target(source.options.dtype))


class _Cached(threading.local):
    """Per stream (thread): the one fused tensor being read in chunks."""

    name: str | None = None
    flat: torch.Tensor | None = None


@dataclass
class FusedReader:
    """The base model's tensors with the adapter applied, under the base's names."""

    adapter: Reader
    base: Reader
    config: AdapterConfig
    layout: AdapterLayout
    target: torch.dtype | None  # --dtype: the dtype the base weight is fused in (None: stored)

    def __post_init__(self) -> None:
        self.root = self.adapter.root
        self._cache = _Cached()
        self._check()

    def _check(self) -> None:
        """Every adapter tensor lands on a base tensor of its shape, with the rank PEFT's
        config gives its module; else nothing is written."""
        base, adapter = self.base.index(), self.adapter.index()
        where = self.adapter.root.url
        for target, name in self.layout.replaced.items():
            info = base.get(target)
            if info is None or info.shape != adapter[name].shape:
                found = f"shape {list(info.shape)}" if info else "no such tensor"
                raise AdapterError(
                    f"{where}: adapter tensor {name!r} replaces {target!r} of shape "
                    f"{list(adapter[name].shape)}, but the base {self.base.root.url} has {found}: "
                    "is --base the model this adapter was trained on?"
                )
        for weight, module in self.layout.modules.items():
            a, b, info = adapter[module.a], adapter[module.b], base.get(weight)
            r, _ = self.config.rank_and_scaling(module.module)
            if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != r or b.shape[1] != r:
                raise AdapterError(
                    f"{where}: {module.module}: lora_A {list(a.shape)} and lora_B "
                    f"{list(b.shape)} are not rank {r} as {self.config.where} gives it "
                    "(r, rank_pattern); ckptflow fuses Linear, Conv1D and Embedding LoRA only"
                )
            if info is None or info.shape != self._delta_shape(module, a.shape, b.shape):
                found = f"shape {list(info.shape)}" if info else "no such tensor"
                raise AdapterError(
                    f"{where}: {module.module}: the adapter changes {weight!r} but the base "
                    f"{self.base.root.url} has {found} (fan_in_fan_out "
                    f"{self.config.fan_in_fan_out}): is --base the model it was trained on?"
                )

    def _transposed(self, module: LoraModule) -> bool:
        return module.embedding or self.config.fan_in_fan_out

    def _delta_shape(
        self, module: LoraModule, a: tuple[int, ...], b: tuple[int, ...]
    ) -> tuple[int, ...]:
        return (a[1], b[0]) if self._transposed(module) else (b[0], a[1])

    @cached_property
    def _index(self) -> dict[str, TensorInfo]:
        adapter = self.adapter.index()
        out: dict[str, TensorInfo] = {}
        for name, info in self.base.index().items():
            if name in self.layout.replaced:
                info = adapter[self.layout.replaced[name]]
            if name in self.layout.modules:
                info = TensorInfo(name, output_dtype(info.dtype, self.target), info.shape)
            out[name] = TensorInfo(name, info.dtype, info.shape)
        return out

    def index(self) -> Mapping[str, TensorInfo]:
        return self._index

    def _stored(self, name: str) -> torch.Tensor:
        """The tensor before fusion: the adapter's replacement, else the base's."""
        replaced = self.layout.replaced.get(name)
        return self.adapter.read(replaced) if replaced else self.base.read(name)

    def read(self, name: str) -> torch.Tensor:
        info = lookup(self._index, name, self.root.url)
        module = self.layout.modules.get(name)
        if module is None:
            return self._stored(name)
        weight = self._stored(name).to(info.dtype)  # as from_pretrained(base, dtype=--dtype)
        return self._merge(module, weight)

    def _merge(self, module: LoraModule, weight: torch.Tensor) -> torch.Tensor:
        """PEFT 0.21's LoraLayer.merge (safe_merge=False) with get_delta_weight, op for op:
        fp16/bf16 A and B are multiplied in fp32 and cast back (to A's dtype for an Embedding,
        B's for a Linear); a Linear adds the delta in place as it is, an Embedding casts it to
        the weight's dtype first."""
        a, b = self.adapter.read(module.a), self.adapter.read(module.b)
        dtype = a.dtype if module.embedding else b.dtype
        cast_to_fp32 = dtype in (torch.float16, torch.bfloat16)  # merged on the CPU
        if cast_to_fp32:
            a, b = a.float(), b.float()
        _, scaling = self.config.rank_and_scaling(module.module)
        product = b @ a
        # In place: the same multiply as PEFT's `* scaling`, without a second weight-sized buffer.
        delta = (product.T if self._transposed(module) else product).mul_(scaling)
        if cast_to_fp32:
            delta = delta.to(dtype=dtype)
        if module.embedding:
            delta = delta.to(weight.dtype)
        weight += delta
        return weight

    def read_range(
        self, name: str, start: int, count: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        passthrough = name not in self.layout.modules and name not in self.layout.replaced
        if passthrough and isinstance(self.base, RangeReader):
            return self.base.read_range(name, start, count, out)
        cache = self._cache
        if cache.name != name or cache.flat is None:
            cache.name, cache.flat = None, None  # the previous one freed before the next is made
            cache.flat, cache.name = self.read(name).reshape(-1), name
        chunk = cache.flat[start : start + count]
        if start + count >= cache.flat.numel():
            cache.name, cache.flat = None, None  # the last chunk: done with this tensor
        return out.copy_(chunk) if out is not None else chunk.clone()

    def facts(self) -> SourceFacts:
        inner = self.adapter.facts()
        targets = sorted({m.module.rsplit(".", 1)[-1] for m in self.layout.modules.values()})
        note = (
            f"LoRA fused into --base {self.base.root.url} as PEFT's merge_and_unload(): "
            f"r={self.config.r}, lora_alpha={self.config.lora_alpha}"
            + (", rslora" if self.config.use_rslora else "")
            + (
                ", rank/alpha patterns"
                if self.config.rank_pattern or self.config.alpha_pattern
                else ""
            )
            + f", {len(self.layout.modules)} modules ({', '.join(targets)})"
            + f", {len(self.layout.replaced)} tensors replaced (modules_to_save)"
        )
        return SourceFacts(inner.format, list(inner.files), [*inner.notes, note])

    def asset_dirs(self) -> list[Location]:
        return [self.base.root]


@dataclass
class KeptAdapterReader:
    """The adapter's tensors under the names PEFT writes to disk (no adapter name)."""

    adapter: Reader
    layout: AdapterLayout
    config: AssetSource

    def __post_init__(self) -> None:
        self.root = self.adapter.root

    @cached_property
    def _names(self) -> dict[str, str]:
        """On-disk name -> the reader's name."""
        names: dict[str, str] = {}
        for module in self.layout.modules.values():
            for name in (module.a, module.b):
                names[self._disk_name(name)] = name
        for target, name in self.layout.replaced.items():
            names[ADAPTER_PREFIX + target] = name
        return names

    def _disk_name(self, name: str) -> str:
        adapter = self.layout.adapter_name
        return name.replace(f".{adapter}.", ".") if adapter else name

    def index(self) -> Mapping[str, TensorInfo]:
        inner = self.adapter.index()
        return {n: TensorInfo(n, inner[s].dtype, inner[s].shape) for n, s in self._names.items()}

    def read(self, name: str) -> torch.Tensor:
        return self.adapter.read(lookup(self._names, name, self.root.url))

    def facts(self) -> SourceFacts:
        inner = self.adapter.facts()
        note = f"LoRA kept as a PEFT adapter directory ({len(self.layout.modules)} modules)"
        return SourceFacts(inner.format, list(inner.files), [*inner.notes, note])

    def asset_dirs(self) -> list[Location]:
        return self.adapter.asset_dirs()


@dataclass(frozen=True)
class OutputFiles:
    """What the output directory holds besides the tensors, and how the weights are named."""

    pattern: str  # weight file names, as plan_shards takes them
    assets: tuple[AssetSource, ...]
    max_shard_bytes: int
    is_model: bool  # model rules apply (tied head); False for an adapter directory


def output_files(reader: Reader, source: Source) -> OutputFiles:
    """An adapter kept: one `adapter_model.safetensors` (PEFT reads no shards) and its config.
    Fused: the base's assets (its config, tokenizer). Otherwise the source's."""
    if isinstance(reader, KeptAdapterReader):
        return OutputFiles(ADAPTER_PATTERN, (reader.config,), 2**62, is_model=False)
    assets = source.assets
    if isinstance(reader, FusedReader):
        assets = tuple(find_assets([reader.base.root]))
    return OutputFiles(SAFETENSORS_PATTERN, assets, source.options.max_shard_bytes, is_model=True)
