"""What a conversion is, as small picklable values: the user's flags (`ConvertFlags`, named,
sizes as text), the options the pipeline uses (`ConvertOptions`, sizes in bytes), the plan
every step takes (`ConversionPlan`: URLs and names, never tensors) and the result."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ckpt_core import __version__
from ckpt_core.dtypes import TargetDtype
from ckpt_core.formats.peft_adapter import LoraMode
from ckpt_core.formats.protocol import OpenOptions
from ckpt_core.pipeline import manifest
from ckpt_core.pipeline.assets import AssetSource
from ckpt_core.pipeline.plan import ShardSpec
from ckpt_core.pipeline.publish import Target
from ckpt_core.pipeline.verify import Report
from ckpt_core.pipeline.writer import FileRecord
from ckpt_core.units import parse_size_bytes

OutputFormat = Literal["hf", "dcp", "pth"]  # what `--to` writes
ModelChoice = Literal["main", "ema", "both"]  # BAGEL-style sources: which models `--models` writes
Device = Literal["cpu", "cuda", "auto"]  # where rank pieces are merged and cast
DtypeFlag = Literal["default", "bf16", "fp16", "fp32", "keep"]  # `--dtype`: default by `--to`
# `--dtype default`, by `--to` (why these: see ckpt_core.pipeline.targets)
DEFAULT_DTYPES: dict[OutputFormat, TargetDtype] = {"hf": "bf16", "dcp": "keep", "pth": "fp16"}

__all__ = [
    "DEFAULT_DTYPES",
    "DtypeFlag",
    "ConversionPlan",
    "ConvertFlags",
    "ConvertOptions",
    "ConvertResult",
    "Device",
    "ModelChoice",
    "OutputFormat",
    "options_from",
]


@dataclass(frozen=True)
class ConvertOptions:
    dtype: TargetDtype = "bf16"
    max_shard_bytes: int = 5 * 10**9
    base: str | None = None  # HF model dir to take config/tokenizer from when the source has none
    strip_prefix: tuple[str, ...] = ()  # name prefixes to strip (DDP `module.`), see prefixes.py
    overwrite: bool = False
    open_options: OpenOptions = field(default_factory=OpenOptions)
    format: str | None = None  # force a format instead of detecting it
    cache_dir: str | None = None  # stage a remote source here first (else: ranged reads)
    allow_overflow: bool = False  # write finite values the dtype cannot hold as inf
    lora: LoraMode = "fuse"  # a LoRA adapter: fused into --base, or kept as an adapter dir
    to: OutputFormat = "hf"  # the output format
    models: ModelChoice = "both"  # BAGEL-style sources with main and EMA weights
    dcp_key: str | None = None  # --to dcp: nest the state dict under this top key ("model")
    stage: str | None = None  # --to pth: the file is {stage}_{hidden_size}[_moe].pth
    hidden_size: int | None = None
    moe: bool = False
    device: Device = "cpu"  # where tensors are merged and cast; the bytes written are the same

    def recorded(self) -> dict[str, Any]:
        """The options as the manifest records them."""
        values = asdict(self)
        values.pop("overwrite")
        values.pop("cache_dir")  # where a copy is cached does not change the conversion
        values.pop("device")  # nor where tensors are merged: the output bytes are the same
        return values


@dataclass(frozen=True, kw_only=True)
class ConvertFlags:
    """The options as `ckptflow convert` and the `convert` flow take them: flat, by name, sizes
    as text. The CLI reads these names off its arguments; the flow has them as parameters."""

    dtype: DtypeFlag = "default"  # the default of the `to` format (DEFAULT_DTYPES)
    max_shard_size: str = "5GB"
    base: str | None = None
    strip_prefix: Sequence[str] | None = None
    latest: bool = False  # SRC holds checkpoint-N dirs: convert the newest (resolved at the edge)
    overwrite: bool = False
    tag: str | None = None
    exclude_frozen: bool = False
    allow_missing: Sequence[str] | None = None
    format: str | None = None
    cache_dir: str | None = None
    allow_overflow: bool = False
    lora: LoraMode = "fuse"
    to: OutputFormat = "hf"
    models: ModelChoice = "both"
    dcp_key: str | None = None
    stage: str | None = None
    hidden_size: int | None = None
    moe: bool = False
    device: Device = "cpu"

    def options(self) -> ConvertOptions:
        """The pipeline's options (the size parsed here, once)."""
        return ConvertOptions(
            dtype=DEFAULT_DTYPES[self.to] if self.dtype == "default" else self.dtype,
            max_shard_bytes=parse_size_bytes(self.max_shard_size),
            base=self.base,
            strip_prefix=tuple(self.strip_prefix or ()),
            overwrite=self.overwrite,
            open_options=OpenOptions(
                tag=self.tag,
                exclude_frozen=self.exclude_frozen,
                base=self.base,
                allow_missing=tuple(self.allow_missing or ()),
            ),
            format=self.format,
            cache_dir=self.cache_dir,
            allow_overflow=self.allow_overflow,
            lora=self.lora,
            to=self.to,
            models=self.models,
            dcp_key=self.dcp_key,
            stage=self.stage,
            hidden_size=self.hidden_size,
            moe=self.moe,
            device=self.device,
        )


def options_from(**flags: Any) -> ConvertOptions:
    """Options from flat flags, given by name only (the fields of `ConvertFlags`)."""
    return ConvertFlags(**flags).options()


@dataclass(frozen=True)
class ConversionPlan:
    src_url: str  # the source as the user named it (and the manifest records it)
    format: str
    options: ConvertOptions
    target: Target
    shards: tuple[ShardSpec, ...]
    dtypes: dict[str, str]  # output name -> output torch dtype name
    assets: tuple[AssetSource, ...]
    dropped: tuple[str, ...]
    source: dict[str, Any]  # url, format, fingerprint, notes: for the manifest
    warnings: tuple[str, ...]
    already_done: bool
    read_url: str = ""  # where readers open it: a --cache-dir copy, else src_url
    left_out: tuple[str, ...] = ()  # --exclude-frozen: what the output lacks (see partial.py)
    # --to dcp/pth: output name -> the source tensor it reads, where they differ (tied copies)
    sources: dict[str, str] = field(default_factory=dict)

    def source_of(self, name: str) -> str:
        """The source tensor an output name reads."""
        return self.sources.get(name, name)

    @property
    def reader_url(self) -> str:
        return self.read_url or self.src_url

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def tensor_count(self) -> int:
        return sum(len(s.tensors) for s in self.shards)

    @property
    def identity(self) -> dict[str, Any]:
        """What makes a published output this very conversion (source and options)."""
        return manifest.identity(self.source, self.options.recorded())

    @property
    def resume_key(self) -> str:
        """What must be equal for a rerun to keep this plan's finished shards: the source (with
        its fingerprint), the options, the shard layout and dtypes, the tool version."""
        same = {
            "identity": self.identity,
            "shards": [[s.filename, list(s.tensors)] for s in self.shards],
            "dtypes": self.dtypes,
            "version": __version__,
        }
        return hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ConvertResult:
    dst_url: str
    report: Report | None
    files: tuple[FileRecord, ...]
    message: str
