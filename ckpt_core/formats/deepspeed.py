"""DeepSpeed ZeRO stage 1/2/3 checkpoints, read without DeepSpeed and without loading them.

The fp32 master weights are rebuilt as DeepSpeed's `zero_to_fp32.py` does, but lazily: the
pickles are replayed by the allow-listed unpickler with the `DEEPSPEED` fragment (safe
stand-ins for DeepSpeed's classes, see unpickle.py), and each parameter is materialised alone
by ranged reads of exactly its slice of each rank's flat fp32 group. Adam moments are never
read. File names and rank arithmetic are in deepspeed_layout, checkpoints without ZeRO
(stage 0) in deepspeed_stage0.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ckpt_core.dtypes import flat_buffer, itemsize
from ckpt_core.errors import FormatError, clip
from ckpt_core.formats.deepspeed_layout import (
    MODEL_RE,
    OPTIM_RE,
    ParamPlan,
    check_ranks,
    open_states,
    rank_files,
    tag_file,
    zero2_plans,
    zero3_plans,
)
from ckpt_core.formats.deepspeed_stage0 import configured_stage, read_stage0
from ckpt_core.formats.protocol import OpenOptions, SourceFacts, TensorInfo, lookup
from ckpt_core.formats.torchzip import LazyTensor, LazyTorchFile
from ckpt_core.io.storage import Location, safe_relative, split_url

__all__ = ["FORMAT", "DeepSpeedFormat", "DeepSpeedReader"]


def _flat(value: Any, where: str, what: str) -> LazyTensor:
    if not isinstance(value, LazyTensor) or len(value.shape) != 1 or value.stride not in ((1,),):
        raise FormatError(f"{where}: {what} is not a flat 1-D tensor ({value!r:.80})")
    return value


@dataclass(frozen=True)
class _Entry:
    """How to produce one output tensor."""

    kind: str  # "trainable" | "frozen" | "buffer"
    info: TensorInfo
    plan: ParamPlan | None = None  # trainable
    fragments: tuple[LazyTensor, ...] = ()  # frozen (one per rank under stage 3) or the buffer


class DeepSpeedReader:
    def __init__(self, root: Location, tag_dir: str, tag: str, options: OpenOptions) -> None:
        self.root = root
        self.tag = tag
        self._tag_dir = tag_dir  # relative to root ("" when root is the tag dir)
        self._options = options
        self._where = root.file(tag_dir) if tag_dir else root.path
        self._files: list[str] = []
        self._notes: list[str] = []
        self._build()

    # -- opening ------------------------------------------------------------------------------
    def _rel(self, name: str) -> str:
        return tag_file(self._tag_dir, name)

    def _build(self) -> None:
        names = self.root.child(self._tag_dir).listdir() if self._tag_dir else self.root.listdir()
        if not any(OPTIM_RE.match(n) for n in names):
            self._build_stage0(names, "no ZeRO optimizer partitions (*_optim_states.pt)")
            return
        optim = rank_files(names, OPTIM_RE, "optimizer partition (*_optim_states.pt)", self._where)
        first = open_states(self.root, self._rel(optim[min(optim)]))
        osd = first.obj.get("optimizer_state_dict") if isinstance(first.obj, dict) else None
        if (not isinstance(osd, dict) or "zero_stage" not in osd) and configured_stage(
            self.root, self._tag_dir, names, self._where
        ) == 0:
            self._build_stage0(names, f"{optim[min(optim)]} is not a ZeRO partition")
            return
        if not isinstance(osd, dict) or "zero_stage" not in osd:
            raise FormatError(
                f"{first.where}: not a ZeRO optimizer partition (no optimizer_state_dict.zero_stage); "
                "bf16 checkpoints written without ZeRO (BF16_Optimizer) are not supported"
            )
        stage = int(osd["zero_stage"])
        count = osd.get("partition_count")
        world = max(count) if isinstance(count, list) else int(count) if count else 0
        if stage not in (1, 2, 3) or world < 1:
            raise FormatError(f"{first.where}: zero_stage={stage}, partition_count={count!r}")
        self.stage, self.world = stage, world
        check_ranks(optim, world, "optimizer partition", "*_optim_states.pt", self._where)

        model = rank_files(names, MODEL_RE, "model states (*_model_states.pt)", self._where)
        if stage == 3:
            check_ranks(
                model,
                world,
                "model states",
                "zero_pp_rank_*_mp_rank_00_model_states.pt",
                self._where,
            )
        elif set(model) != {0}:
            raise FormatError(
                f"{self._where}: expected one mp_rank_00_model_states.pt for stage {stage}"
            )
        states = [open_states(self.root, self._rel(model[rank])).obj for rank in sorted(model)]
        for rank, state in enumerate(states):
            if not isinstance(state, dict) or "param_shapes" not in state:
                raise FormatError(
                    f"{self._where}/{model[rank]}: not a ZeRO model states file (no param_shapes)"
                )
        head = states[0]
        dp = head.get("dp_world_size")
        if dp is not None and int(dp) != world:
            raise FormatError(
                f"{self._where}/{model[0]}: dp_world_size={dp} but the optimizer partitions "
                f"say partition_count={world}"
            )
        partitions = [first] + [
            open_states(self.root, self._rel(optim[rank])) for rank in range(1, world)
        ]
        self._files = [self._rel(optim[r]) for r in range(world)] + [
            self._rel(model[r]) for r in sorted(model)
        ]
        self._entries = self._plan(head, states, partitions)
        self._notes += [
            f"DeepSpeed ZeRO stage {stage}, tag {self.tag}, data-parallel world size {world}, "
            f"written by deepspeed {head.get('ds_version', '?')}",
            "parameters are the fp32 master weights from the optimizer partitions "
            "(as zero_to_fp32 rebuilds them); frozen parameters and buffers keep their stored dtype",
        ]

    def _build_stage0(self, names: list[str], why: str) -> None:
        """No ZeRO (stage 0): every weight in full in `module` (see deepspeed_stage0)."""
        found = read_stage0(
            self.root, self._tag_dir, names, where=self._where, tag=self.tag, why=why
        )
        self.stage, self.world = 0, found.world
        self._files = [found.file]
        self._entries = {
            name: _Entry("module", TensorInfo(name, value.dtype, value.shape), None, (value,))
            for name, value in found.module.items()
        }
        self._notes += found.notes

    # -- the plan -----------------------------------------------------------------------------
    def _plan(
        self, head: dict[str, Any], states: list[Any], partitions: list[LazyTorchFile]
    ) -> dict[str, _Entry]:
        shapes_by_group = [
            {str(k): tuple(int(d) for d in v) for k, v in group.items()}
            for group in head["param_shapes"]
        ]
        key = "fp32_flat_groups" if self.stage == 3 else "single_partition_of_fp32_groups"
        groups: list[list[LazyTensor]] = []
        for rank, part in enumerate(partitions):
            osd = part.obj.get("optimizer_state_dict", {}) if isinstance(part.obj, dict) else {}
            values = osd.get(key)
            if not isinstance(values, list | tuple) or int(osd.get("zero_stage", -1)) != self.stage:
                raise FormatError(
                    f"{part.where}: no {key} for ZeRO stage {self.stage} (rank {rank}); "
                    "is it from another checkpoint?"
                )
            groups.append([_flat(v, part.where, f"{key}[{i}]") for i, v in enumerate(values)])
        self._groups = groups
        try:
            if self.stage == 3:
                numels = [t.numel for t in groups[0]]
                for rank, flats in enumerate(groups):
                    if [t.numel for t in flats] != numels:
                        raise ValueError(f"rank {rank}'s flat groups differ in size from rank 0's")
                plans = zero3_plans(shapes_by_group, numels, self.world, self._where)
            else:
                first_osd = partitions[0].obj["optimizer_state_dict"]
                paddings = first_osd.get("param_alignment_paddings")
                plans = zero2_plans(
                    shapes_by_group, [[t.numel for t in f] for f in groups], paddings, self._where
                )
        except ValueError as e:
            raise FormatError(f"{self._where}: {e}") from e

        entries: dict[str, _Entry] = {}
        for plan in plans:
            dtype = groups[0][plan.pieces[0].group].dtype if plan.pieces else torch.float32
            entries[plan.name] = _Entry("trainable", TensorInfo(plan.name, dtype, plan.shape), plan)
        frozen = head.get("frozen_param_shapes") or {}
        if frozen and self._options.exclude_frozen:
            self._notes.append(f"left out {len(frozen)} frozen parameters (exclude_frozen)")
        elif frozen:
            for name, shape in frozen.items():
                entries[name] = self._frozen_entry(str(name), tuple(int(d) for d in shape), states)
        module = head.get("module") or {}
        buffer_names = list(head.get("buffer_names") or [])
        shared = head.get("shared_params") or {}
        if self.stage <= 2:
            # Stage 1 records no frozen_param_shapes (DeepSpeed saves them only when gradients are
            # partitioned), so zero_to_fp32 silently drops frozen params; the full 16-bit copy of
            # every param is in `module` under stages 1/2, so take the unrecorded ones from there.
            known = set(entries) | set(frozen) | set(buffer_names) | set(shared)
            extra = [n for n, v in module.items() if n not in known and isinstance(v, LazyTensor)]
            if extra and self._options.exclude_frozen:
                self._notes.append(f"left out {len(extra)} frozen parameters (exclude_frozen)")
            elif extra:
                for name in extra:
                    value = module[name]
                    info = TensorInfo(name, value.dtype, value.shape)
                    entries[name] = _Entry("frozen", info, None, (value,))
                self._notes.append(
                    f"{len(extra)} parameters not owned by the optimizer (frozen) taken from the "
                    f"16-bit module copy: {clip(extra)} (zero_to_fp32 leaves these out)"
                )
        for name in buffer_names:
            value = module.get(name)
            if not isinstance(value, LazyTensor):
                raise FormatError(f"{self._where}: buffer {name} is named but not saved in module")
            entries[name] = _Entry(
                "buffer", TensorInfo(name, value.dtype, value.shape), None, (value,)
            )
        for alias, owner in shared.items():
            if owner in entries and alias not in entries:
                entries[alias] = _Entry(
                    entries[owner].kind,
                    TensorInfo(alias, entries[owner].info.dtype, entries[owner].info.shape),
                    entries[owner].plan,
                    entries[owner].fragments,
                )
        if shared:
            self._notes.append(f"shared parameters (alias -> owner): {dict(shared)}")
        # Checkpoint order: the model's own (module) order, then anything it does not name.
        order = [n for n in module if n in entries] + [n for n in entries if n not in module]
        return {name: entries[name] for name in order}

    def _frozen_entry(self, name: str, shape: tuple[int, ...], states: list[Any]) -> _Entry:
        fragments: list[LazyTensor] = []
        for rank, state in enumerate(states):
            value = (state.get("frozen_param_fragments") or {}).get(name)
            if not isinstance(value, LazyTensor):
                raise FormatError(
                    f"{self._where}: frozen parameter {name} has no fragment on rank {rank}"
                )
            fragments.append(value)
        info = TensorInfo(name, fragments[0].dtype, shape)
        if self.stage != 3 and fragments[0].shape != shape:
            raise FormatError(
                f"{self._where}: frozen parameter {name} is saved with shape "
                f"{list(fragments[0].shape)}, expected {list(shape)}"
            )
        if self.stage == 3 and sum(f.numel for f in fragments) < info.numel:
            raise FormatError(
                f"{self._where}: frozen parameter {name}: the rank fragments hold "
                f"{sum(f.numel for f in fragments)} elements, expected {info.numel}"
            )
        return _Entry("frozen", info, None, tuple(fragments))

    # -- Reader -------------------------------------------------------------------------------
    def index(self) -> Mapping[str, TensorInfo]:
        return {name: entry.info for name, entry in self._entries.items()}

    def _entry(self, name: str) -> _Entry:
        return lookup(self._entries, name, self._where)

    def _segments(self, name: str, entry: _Entry) -> list[tuple[LazyTensor, int, int]]:
        """The tensor's elements in C order as (flat source, first element, count) runs."""
        info = entry.info
        if entry.kind == "trainable" and entry.plan is not None:
            runs = []
            for piece in entry.plan.pieces:
                flat = self._groups[piece.rank][piece.group]
                if piece.start + piece.count > flat.numel or flat.dtype != info.dtype:
                    raise FormatError(f"{flat.source.where}: {name} lies outside its flat group")
                runs.append((flat, piece.start, piece.count))
            return runs
        if entry.kind == "frozen" and self.stage == 3:
            runs, filled = [], 0
            for fragment in entry.fragments:  # rank order; the tail of the last ones is padding
                take = min(fragment.numel, info.numel - filled)
                if take:
                    runs.append((_flat(fragment, self._where, name), 0, take))
                filled += take
            return runs
        return [(entry.fragments[0], 0, info.numel)]

    def read(self, name: str) -> torch.Tensor:
        entry = self._entry(name)
        if entry.kind != "trainable" and not entry.fragments[0].is_contiguous():
            return entry.fragments[0].materialize()
        return self.read_range(name, 0, entry.info.numel).view(entry.info.shape)

    def read_range(
        self, name: str, start: int, count: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Elements [start, start+count) of a tensor in C order, 1-D: a big tensor can be
        streamed in bounded chunks (a writer may use this when present)."""
        entry = self._entry(name)
        info = entry.info
        if start < 0 or count < 0 or start + count > info.numel:
            raise IndexError(f"{name}: elements [{start}, {start + count}) of {info.numel}")
        out = flat_buffer(out, count, info.dtype)
        if entry.kind != "trainable" and not entry.fragments[0].is_contiguous():
            return out.copy_(entry.fragments[0].materialize().reshape(-1)[start : start + count])
        position, filled, end = 0, 0, start + count
        for flat, first, length in self._segments(name, entry):
            lo, hi = max(start, position), min(end, position + length)
            if lo < hi:
                _read_elements(flat, first + lo - position, out[filled : filled + hi - lo])
                filled += hi - lo
            position += length
        if position != info.numel or filled != count:
            raise FormatError(f"{self._where}: {name}: found {position} of {info.numel} elements")
        return out

    def facts(self) -> SourceFacts:
        return SourceFacts("deepspeed", list(self._files), list(self._notes))

    def asset_dirs(self) -> list[Location]:
        dirs = [self.root, Location(split_url(self.root.url)[0])]
        if self._tag_dir:
            dirs.insert(0, self.root.child(self._tag_dir))
        return dirs


def _read_elements(flat: LazyTensor, start: int, out: torch.Tensor) -> None:
    """Elements [start, start+len(out)) of a flat tensor: one ranged read into `out`."""
    if flat.storage_offset + start + out.numel() > flat.storage.numel:
        raise FormatError(f"{flat.source.where}: read past the end of storage {flat.storage.key}")
    offset = flat.source.record_offset(flat.storage.key)
    flat.source.read_into(offset + (flat.storage_offset + start) * itemsize(flat.dtype), out)


class DeepSpeedFormat:
    name = "deepspeed"

    def detect(self, root: Location) -> bool:
        names = root.listdir()
        if any(MODEL_RE.match(n) for n in names):
            return True  # pointed at the tag dir itself
        if "latest" in names and not root.isdir("latest"):
            # `latest` alone is a common name: the tag it names must hold ZeRO model states.
            try:
                tag = root.read_text("latest").strip()
                return bool(tag) and any(MODEL_RE.match(m) for m in root.child(tag).listdir())
            except (OSError, UnicodeDecodeError, ValueError):
                return False
        return any(
            n.startswith("global_step") and any(MODEL_RE.match(m) for m in root.child(n).listdir())
            for n in names
        )

    def open(self, root: Location, options: OpenOptions) -> DeepSpeedReader:
        names = root.listdir()
        if options.tag:
            tag = safe_relative(options.tag, root.path)
            if not root.isdir(tag):
                if posixpath.basename(root.path) == tag and any(MODEL_RE.match(n) for n in names):
                    return DeepSpeedReader(root, "", tag, options)
                raise FormatError(f"{root.file(tag)}: no such checkpoint tag directory")
            return DeepSpeedReader(root, tag, tag, options)
        if any(MODEL_RE.match(n) for n in names):
            return DeepSpeedReader(root, "", posixpath.basename(root.path), options)
        if "latest" in names:
            tag = root.read_text("latest").strip()
            safe = safe_relative(tag, root.file("latest"))
            if not root.isdir(safe):
                raise FormatError(
                    f"{root.file('latest')} names tag {tag!r} but {root.file(safe)} does not exist"
                )
            return DeepSpeedReader(root, safe, tag, options)
        steps = [n for n in names if n.startswith("global_step") and root.isdir(n)]
        if len(steps) == 1:
            return DeepSpeedReader(root, steps[0], steps[0], options)
        raise FormatError(
            f"{root.path}: no `latest` file and {len(steps)} tag directories "
            f"({clip(steps)}): pass the tag to read (--tag)"
        )


FORMAT = DeepSpeedFormat()
