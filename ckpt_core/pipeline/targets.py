"""Back into training formats (`--to dcp`, `--to pth`): what such an output holds and is named.

A trainer loads these into a model it builds from the config (`dcp.load(model.state_dict())`,
`model.load_state_dict(torch.load of the file, strict=True)`), so the output holds the in-memory state
dict: every name `model.state_dict()` has, tied copies included (save_pretrained leaves them
out; a strict load needs them), in its order. Each output name reads one source tensor: itself,
the saved tensor it is when transformers saves it whole under another name, or the tensor a
tied copy repeats. A model whose in-memory tensor is saved as several pieces (fused MoE experts)
is refused: assembling it is not built yet.

Default dtypes (`conversion.DEFAULT_DTYPES`): `pth` fp16 (what MiniMind-style trainers save and load); `dcp` keeps each stored
dtype: FSDP's `dcp.load` copies into the model's own parameters, casting to whatever dtype the
trainer built them in, so keeping loses nothing and adds nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ckpt_core.dtypes import itemsize, output_dtype
from ckpt_core.errors import ConfigError, FormatError, UsageError
from ckpt_core.families.hf_layout import model_layout
from ckpt_core.formats.dcp import METADATA, TRAINER_KEYS, DcpReader
from ckpt_core.formats.protocol import Reader, TensorInfo
from ckpt_core.io.storage import Location
from ckpt_core.pipeline import to_dcp, to_pth
from ckpt_core.pipeline.conversion import ConversionPlan, ConvertOptions
from ckpt_core.pipeline.plan import ShardSpec
from ckpt_core.pipeline.resolve import pretrained_name
from ckpt_core.pipeline.save_layout import config_where
from ckpt_core.pipeline.source import Source
from ckpt_core.pipeline.stream import ChunkBuffers
from ckpt_core.pipeline.verify import ShardCheck, verify_read_back
from ckpt_core.pipeline.writer import FileRecord

__all__ = [
    "DCP_DATA_FILE",
    "TrainingLayout",
    "TrainingPlan",
    "check_flags",
    "plan_training",
    "pth_filename",
    "training_layout",
    "verify_training",
    "write_training",
    "write_training_index",
]

Chunks = Callable[[str], Iterator[torch.Tensor]]
OnBytes = Callable[[int], None]
Layout = Sequence[tuple[str, torch.dtype, tuple[int, ...]]]

# DCP's FileSystemWriter in one process, one thread: every tensor in `__0_0.distcp`.
DCP_DATA_FILE = "__0_0.distcp"
_MOE_KEYS = ("use_moe", "num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class TrainingPlan:
    shards: tuple[ShardSpec, ...]  # one file: the DCP data file, or the .pth
    dtypes: dict[str, torch.dtype]  # output name -> output dtype
    sources: dict[str, str]  # output name -> source tensor name, where they differ


@dataclass(frozen=True)
class TrainingLayout:
    names: tuple[str, ...]  # output names, in the model's state-dict order
    sources: dict[str, str]  # output name -> the source tensor it reads, where they differ


def check_flags(options: ConvertOptions) -> None:
    """Flags of one target given to another are refused, not ignored."""
    if options.dcp_key is not None and options.to != "dcp":
        raise UsageError(f"--dcp-key is for --to dcp (this conversion writes --to {options.to})")
    if options.dcp_key is not None and (
        not options.dcp_key or "." in options.dcp_key or options.dcp_key in TRAINER_KEYS
    ):
        raise UsageError(
            f"--dcp-key {options.dcp_key!r}: give one plain name such as model (not a "
            "trainer-state key such as optimizer)"
        )
    given = [
        flag
        for flag, value in (
            ("--stage", options.stage),
            ("--hidden-size", options.hidden_size),
            ("--moe", options.moe or None),
        )
        if value is not None
    ]
    if given and options.to != "pth":
        raise UsageError(
            f"{', '.join(given)}: for --to pth (this conversion writes --to {options.to})"
        )
    if options.to == "pth" and not options.stage:
        raise UsageError(
            "--to pth needs --stage STAGE (e.g. pretrain, full_sft): the file is named "
            "{stage}_{hidden_size}[_moe].pth so that `ckptflow resolve` finds it"
        )


def pth_filename(options: ConvertOptions, config: Mapping[str, Any] | None, where: str) -> str:
    """`{stage}_{hidden}[_moe].pth`; the hidden size and MoE-ness from the config when not given,
    and refused when the flags contradict the config (the name would lie about the model)."""
    assert options.stage is not None  # check_flags
    stated = (config or {}).get("hidden_size")
    hidden = options.hidden_size if options.hidden_size is not None else stated
    if hidden is None:
        raise UsageError(f"{where}: no hidden_size in the config: pass --hidden-size N")
    if stated is not None and int(stated) != int(hidden):
        raise UsageError(
            f"--hidden-size {hidden}: the config at {where} says hidden_size={stated}; the file "
            "name would name another model size"
        )
    if config is not None and _is_moe(config) and not options.moe:
        raise UsageError(f"{where}: the config describes a mixture-of-experts model: add --moe")
    if config is not None and options.moe and not _is_moe(config):
        raise UsageError(f"--moe: the config at {where} describes a dense model")
    return pretrained_name(options.stage, int(hidden), moe=options.moe)


def _is_moe(config: Mapping[str, Any]) -> bool:
    return any(bool(config.get(key)) for key in _MOE_KEYS)


def training_layout(
    index: Mapping[str, TensorInfo], config: Mapping[str, Any] | None, where: str
) -> TrainingLayout:
    """The output names and where each is read from. Without a config: the source's names as
    they are (the verdict then says the keys were not checked)."""
    if config is None:
        return TrainingLayout(tuple(index), {})
    layout = model_layout(config, where)
    whole: dict[str, str] = {}  # in-memory name -> the saved name holding all of it
    pieces: dict[str, int] = {}
    for saved, piece in layout.saved.items():
        pieces[piece.source] = pieces.get(piece.source, 0) + 1
        if not piece.offset and piece.contiguous and piece.shape == layout.memory[piece.source]:
            whole[piece.source] = saved
    names: list[str] = []
    sources: dict[str, str] = {}
    for name, shape in layout.memory.items():
        source = _source_of(name, index, whole, layout.tied)
        if source is None:
            if pieces.get(name, 0) > 1:
                raise ConfigError(
                    f"{where}: {layout.architecture} holds {name} in memory as one tensor that "
                    f"transformers saves as {pieces[name]} pieces (e.g. fused MoE experts); "
                    "--to dcp/pth cannot assemble it yet: convert --to hf instead"
                )
            continue  # absent on purpose (--allow-missing, --exclude-frozen): the check said so
        if tuple(index[source].shape) != shape:
            raise ConfigError(
                f"{where}: {name} is {list(shape)} in {layout.architecture} but its source "
                f"{source} is {list(index[source].shape)}"
            )
        names.append(name)
        if source != name:
            sources[name] = source
    return TrainingLayout(tuple(names), sources)


def _source_of(
    name: str, index: Mapping[str, TensorInfo], whole: Mapping[str, str], tied: Mapping[str, str]
) -> str | None:
    if name in index:
        return name
    saved = whole.get(name)
    if saved is not None and saved in index:
        return saved
    repeated = tied.get(name)
    if repeated is not None:
        return _source_of(repeated, index, whole, {})
    return None


# -- the steps of a conversion that writes a training format -----------------------------------
def plan_training(
    index: Mapping[str, TensorInfo],
    source: Source,
    target: torch.dtype | None,
    *,
    several_models: bool,
) -> TrainingPlan:
    """The one output file, its tensors in the model's order, their dtypes and sources."""
    options, where = source.options, config_where(source)
    if several_models:
        raise UsageError(
            f"--to {options.to} writes one model: this source is several (BAGEL main/EMA) or an "
            "adapter kept as is (--lora keep); convert it --to hf"
        )
    layout = training_layout(index, source.config, where)
    if not layout.names:
        raise FormatError(f"{where}: nothing of the model to write")
    read = [index[layout.sources.get(n, n)] for n in layout.names]
    pairs = list(zip(layout.names, read, strict=True))
    dtypes = {n: output_dtype(info.dtype, target) for n, info in pairs}
    nbytes = sum(info.numel * itemsize(dtypes[n]) for n, info in pairs)
    filename = DCP_DATA_FILE if options.to == "dcp" else pth_filename(options, source.config, where)
    return TrainingPlan((ShardSpec(filename, layout.names, nbytes),), dtypes, layout.sources)


def write_training(
    plan: ConversionPlan,
    layout: Layout,
    chunks_into: Callable[[ChunkBuffers], Chunks],
    on_bytes: OnBytes | None,
) -> FileRecord:
    """Write the plan's one file (DCP: also its `.metadata`); each tensor is materialised from
    its chunks only when the format's writer takes it. `chunks_into(buffers)`: the source's
    chunks, read into the buffers given (here: straight into the tensor being filled)."""
    work = Location(plan.target.work_url)
    shapes = {n: (dtype, shape) for n, dtype, shape in layout}
    # DCP writes each tensor before it asks for the next: one reused buffer serves them all.
    # A .pth pickles the whole dict at the end: each tensor its own memory.
    empty = to_dcp.one_buffer(layout) if plan.options.to == "dcp" else _fresh
    landing = _InPlace()
    chunks = chunks_into(landing)

    def produce(name: str) -> torch.Tensor:
        dtype, shape = shapes[name]
        out = empty(dtype, shape)
        landing.target = flat = out.reshape(-1)
        landing.filled = 0
        try:
            for chunk in chunks(name):
                count, start = chunk.numel(), landing.filled
                if start + count > flat.numel():
                    raise FormatError(f"{name}: the source yields more than {list(shape)}")
                place = flat[start : start + count]
                if count and chunk.data_ptr() != place.data_ptr():  # not read in place
                    place.copy_(chunk)
                landing.filled += count
                if on_bytes:
                    on_bytes(count * chunk.element_size())
        finally:
            landing.target = None
        if landing.filled != flat.numel():
            raise FormatError(f"{name}: the source yields {landing.filled} of {flat.numel()}")
        return out

    filename = plan.shards[0].filename
    if plan.options.to == "dcp":
        return to_dcp.write_dcp(work, layout, produce, key=plan.options.dcp_key, data_file=filename)
    return to_pth.write_pth(work, filename, layout, produce, plan.sources)


class _InPlace(ChunkBuffers):
    """Chunk buffers that are the next elements of the tensor being filled, so a reader reads
    (or a cast writes) each chunk where it belongs and nothing is copied again. Any other
    request (a stored-dtype scratch before a cast) gets an ordinary reused buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.target: torch.Tensor | None = None  # flat
        self.filled = 0  # elements consumed so far: the next chunk starts here

    def take(self, count: int, dtype: torch.dtype) -> torch.Tensor:
        target, start = self.target, self.filled
        if target is not None and target.dtype == dtype and start + count <= target.numel():
            return target[start : start + count]
        return super().take(count, dtype)


def _fresh(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def write_training_index(plan: ConversionPlan) -> list[FileRecord]:
    """DCP's `.metadata` (written with the data, listed here like a safetensors index)."""
    if plan.options.to == "dcp":
        return [to_dcp.metadata_record(Location(plan.target.work_url))]
    return []


def verify_training(
    plan: ConversionPlan, shard_number: int, chunks: Chunks, on_bytes: OnBytes | None
) -> ShardCheck:
    """The output re-read by ckptflow's own reader of its format, against the source."""
    work = Location(plan.target.work_url)
    shard = plan.shards[shard_number]
    reader: Reader
    if plan.options.to == "dcp":
        found = to_dcp.saved_fqns(work)
        wanted = to_dcp.expected_fqns(shard.tensors, plan.options.dcp_key)
        if found != wanted:
            raise FormatError(
                f"{work.file(METADATA)}: holds other names than planned "
                f"(unplanned: {sorted(found - wanted)[:5]}, lacking: {sorted(wanted - found)[:5]})"
            )
        reader = DcpReader(work)
    else:
        reader = to_pth.read_back(work, shard.filename)
    return verify_read_back(reader, shard, chunks, on_bytes)
