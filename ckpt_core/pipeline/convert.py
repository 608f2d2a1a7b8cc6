"""The convert pipeline as plain steps: plan -> write shards -> index -> assets -> verify -> publish.

Each step takes the small, picklable `ConversionPlan` (URLs and names, never tensors), so the
CLI runs them in-process and the Prefect flow runs the same functions as tasks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ckpt_core import __version__
from ckpt_core.dtypes import itemsize, output_dtype, parse_target
from ckpt_core.errors import FormatError, KeyMismatchError, VerifyError
from ckpt_core.formats.protocol import OpenOptions, Reader, TensorInfo
from ckpt_core.formats.registry import detect, get_format
from ckpt_core.io import retry
from ckpt_core.io.lock import destination_lock
from ckpt_core.io.stage import remote_stamp, stage_source
from ckpt_core.io.storage import Location
from ckpt_core.pipeline import manifest
from ckpt_core.pipeline.assets import AssetSource, find_assets, read_config, tie_word_embeddings
from ckpt_core.pipeline.plan import SAFETENSORS_INDEX, ShardSpec, index_json, plan_shards
from ckpt_core.pipeline.publish import (
    Target,
    abandon,
    check_destination,
    discard,
    ensure_unfinished,
    finalize,
    finished,
    prepare,
    record_done,
    refuse_inside,
    target_for,
)
from ckpt_core.pipeline.stream import ChunkBuffers, release_freed_memory, source_chunks
from ckpt_core.pipeline.verify import Report, ShardCheck, combine, verify_shard
from ckpt_core.pipeline.writer import FileRecord, write_bytes, write_safetensors
from ckpt_core.units import parse_size_bytes

OnBytes = Callable[[int], None]
TIED_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class ConvertOptions:
    dtype: str = "bf16"  # bf16 | fp16 | fp32 | keep
    max_shard_bytes: int = 5 * 10**9
    base: str | None = None  # HF model dir to take config/tokenizer from when the source has none
    overwrite: bool = False
    open_options: OpenOptions = field(default_factory=OpenOptions)
    format: str | None = None  # force a format instead of detecting it
    cache_dir: str | None = None  # stage a remote source here first (else: ranged reads)

    def recorded(self) -> dict[str, Any]:
        """The options as the manifest records them."""
        values = asdict(self)
        values.pop("overwrite")
        values.pop("cache_dir")  # where a copy is cached does not change the conversion
        return values


def options_from(
    dtype: str = "bf16",
    max_shard_size: str = "5GB",
    base: str | None = None,
    overwrite: bool = False,
    tag: str | None = None,
    exclude_frozen: bool = False,
    allow_missing: Sequence[str] | None = None,
    format: str | None = None,
    cache_dir: str | None = None,
) -> ConvertOptions:
    """Options from the CLI's and the flow's flat parameters (sizes parsed here, once)."""
    return ConvertOptions(
        dtype=dtype,
        max_shard_bytes=parse_size_bytes(max_shard_size),
        base=base,
        overwrite=overwrite,
        open_options=OpenOptions(
            tag=tag,
            exclude_frozen=exclude_frozen,
            base=base,
            allow_missing=tuple(allow_missing or ()),
        ),
        format=format,
        cache_dir=cache_dir,
    )


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
    def resume_key(self) -> str:
        """What must be equal for a rerun to keep this plan's finished shards: the source (with
        its fingerprint), the options, the shard layout and dtypes, the tool version."""
        same = {
            "identity": manifest.identity(self.source, self.options.recorded()),
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


# Readers opened in this process, by source and its fingerprint: the steps of one conversion
# share one index, and a source that changes (a new `latest` tag) is opened afresh.
_READERS: OrderedDict[tuple[object, ...], Reader] = OrderedDict()
_READERS_LOCK = threading.Lock()


def _reader_key(plan: ConversionPlan) -> tuple[object, ...]:
    return (plan.reader_url, plan.format, plan.options.open_options, plan.source["fingerprint"])


def _remember(key: tuple[object, ...], reader: Reader) -> None:
    with _READERS_LOCK:
        _READERS[key] = reader
        while len(_READERS) > 8:
            _READERS.popitem(last=False)


def source_fingerprint(reader: Reader, src_url: str, read_url: str) -> str:
    """Sizes and change stamps of the files read; of the remote listing for a staged copy."""
    if read_url != src_url:
        return remote_stamp(src_url)
    return manifest.fingerprint(reader.root, reader.facts().files)


def reader_for(plan: ConversionPlan) -> Reader:
    """The plan's reader: this process's, or opened again (another worker) and checked to be
    reading the very files the plan was made from."""
    key = _reader_key(plan)
    with _READERS_LOCK:
        found = _READERS.get(key)
    if found is not None:
        return found
    reader = get_format(plan.format).open(Location(plan.reader_url), plan.options.open_options)
    check_source_unchanged(plan, reader)
    _remember(key, reader)
    return reader


def check_source_unchanged(plan: ConversionPlan, reader: Reader | None = None) -> None:
    """The source files still have the sizes and modification stamps they had at planning."""
    now = source_fingerprint(reader or reader_for(plan), plan.src_url, plan.reader_url)
    if now != plan.source["fingerprint"]:
        raise VerifyError(
            f"{plan.src_url}: the source checkpoint changed while it was being converted "
            "(is training still writing it?); nothing was published: run the conversion again"
        )


def plan_conversion(src_url: str, dst_url: str, options: ConvertOptions) -> ConversionPlan:
    read_url = stage_source(src_url, options.cache_dir) if options.cache_dir else src_url
    fmt = get_format(options.format) if options.format else detect(read_url)
    reader = fmt.open(Location(read_url), options.open_options)
    src, dst = Location(src_url), Location(dst_url)
    refuse_inside(dst, src, "source checkpoint")
    asset_dirs = list(reader.asset_dirs())
    if options.base:
        refuse_inside(dst, Location(options.base), "base model")
        asset_dirs.append(Location(options.base))
    assets = find_assets(asset_dirs)
    config = read_config(assets)
    index = dict(reader.index())
    if not index:
        raise FormatError(f"{src_url}: the checkpoint holds no tensors")
    dropped = _tied_names(index, config, src_url)
    target_dtype = parse_target(options.dtype)
    out = {
        n: output_dtype(info.dtype, target_dtype) for n, info in index.items() if n not in dropped
    }

    def out_bytes(name: str) -> int:
        return index[name].numel * itemsize(out[name])

    shards = plan_shards(list(out), out_bytes, options.max_shard_bytes)
    facts = reader.facts()
    source = {
        "url": src_url,
        "format": fmt.name,
        "fingerprint": source_fingerprint(reader, src_url, read_url),
        "notes": list(facts.notes),
    }
    target = target_for(dst)
    done = check_destination(dst, manifest.identity(source, options.recorded()), options.overwrite)
    warnings = (
        ()
        if config
        else (
            "no config.json in the source or --base: the output holds weights, index and manifest only; "
            "pass --base DIR (the HF model the checkpoint was trained from) to add config and tokenizer",
        )
    )
    plan = ConversionPlan(
        src_url,
        fmt.name,
        options,
        target,
        tuple(shards),
        {n: str(d).removeprefix("torch.") for n, d in out.items()},
        tuple(assets),
        tuple(sorted(dropped)),
        source,
        warnings,
        done,
        read_url,
    )
    _remember(_reader_key(plan), reader)
    return plan


def _tied_names(
    index: dict[str, TensorInfo], config: dict[str, Any] | None, src_url: str
) -> set[str]:
    """transformers does not save a tied lm_head; an untied model must have one."""
    if config is None:
        return set()
    tied = tie_word_embeddings(config)
    if tied and TIED_HEAD in index:
        return {TIED_HEAD}
    if (
        not tied
        and TIED_HEAD not in index
        and any(n.endswith("embed_tokens.weight") for n in index)
    ):
        raise KeyMismatchError(
            f"{src_url}: config.json says tie_word_embeddings=false but the checkpoint has no "
            f"{TIED_HEAD}; the output would load with a random head"
        )
    return set()


def start(plan: ConversionPlan) -> str:
    """A place to write into, keeping a previous attempt's finished shards of the same plan;
    returns its URL."""
    return prepare(plan.target, plan.resume_key).url


def lock(
    plan: ConversionPlan, wait_seconds: float | None = None
) -> contextlib.AbstractContextManager[None]:
    """Hold the destination for the whole run (start to publish): a second run to the same
    destination waits up to `wait_seconds` (CKPTFLOW_LOCK_WAIT_SECONDS, default 0) or fails."""
    if wait_seconds is None:
        wait_seconds = float(os.environ.get("CKPTFLOW_LOCK_WAIT_SECONDS", "0"))
    return destination_lock(Location(plan.target.dst_url), wait_seconds)


def still_needed(plan: ConversionPlan) -> bool:
    """Checked again under the lock: another run may have published while this one waited."""
    identity = manifest.identity(plan.source, plan.options.recorded())
    return not check_destination(Location(plan.target.dst_url), identity, plan.options.overwrite)


# Tests only: slows every tensor so that a test can kill a run at a chosen point.
_TEST_DELAY_ENV = "CKPTFLOW_TEST_DELAY_PER_TENSOR_SECONDS"


def _chunks(plan: ConversionPlan) -> Callable[[str], Iterator[torch.Tensor]]:
    """Source tensors as bounded flat chunks, cast to their output dtype, in reused buffers
    (one stream: the writer's or the verifier's prefetch loop)."""
    release_freed_memory()  # every process that writes or verifies: CLI, flow workers, benches
    reader = reader_for(plan)
    index = reader.index()
    buffers = ChunkBuffers()
    delay = float(os.environ.get(_TEST_DELAY_ENV, "0") or 0)

    def chunks(name: str) -> Iterator[torch.Tensor]:
        if delay:
            time.sleep(delay)
        return source_chunks(
            reader, index[name], getattr(torch, plan.dtypes[name]), buffers=buffers
        )

    return chunks


def write_shard(
    plan: ConversionPlan, shard_number: int, on_bytes: OnBytes | None = None
) -> FileRecord:
    """Write one shard, or keep it when a previous attempt finished it (its bytes re-hashed)."""
    shard = plan.shards[shard_number]
    work = Location(plan.target.work_url)
    kept = finished(work, shard.filename)
    if kept is not None:
        if on_bytes:
            on_bytes(shard.nbytes)
        return kept
    index = reader_for(plan).index()
    layout = [(n, getattr(torch, plan.dtypes[n]), index[n].shape) for n in shard.tensors]

    def attempt() -> FileRecord:
        ensure_unfinished(plan.target)
        return write_safetensors(work, shard.filename, layout, _chunks(plan), on_bytes)

    record = retry.call(work.file(shard.filename), attempt)
    ensure_unfinished(plan.target)
    record_done(work, record)
    return record


def write_index(plan: ConversionPlan) -> list[FileRecord]:
    index = index_json(plan.shards)
    if index is None:
        return []
    data = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
    return [write_bytes(Location(plan.target.work_url), SAFETENSORS_INDEX, data)]


def copy_assets(plan: ConversionPlan) -> list[FileRecord]:
    work = Location(plan.target.work_url)
    return [write_bytes(work, a.name, Location(a.url).read_bytes(a.name)) for a in plan.assets]


def verify_one(
    plan: ConversionPlan, shard_number: int, on_bytes: OnBytes | None = None
) -> ShardCheck:
    return verify_shard(
        Location(plan.target.work_url), plan.shards[shard_number], _chunks(plan), on_bytes
    )


def report(plan: ConversionPlan, checks: Sequence[ShardCheck], other_files: int) -> Report:
    notes = list(plan.source["notes"]) + list(plan.warnings)
    return combine(checks, other_files, plan.dropped, notes)


def publish(plan: ConversionPlan, files: Sequence[FileRecord], result: Report) -> ConvertResult:
    """Manifest and marker, then into place; a failed verification publishes nothing."""
    try:
        check_source_unchanged(plan)
    except VerifyError:
        discard(plan.target)
        raise
    if not result.ok:
        discard(plan.target)
        raise VerifyError(
            f"{plan.target.dst_url}: {len(result.mismatches)} tensors differ from the source after "
            f"writing ({', '.join(result.mismatches[:5])}); nothing was published"
        )
    summary = {
        "tensors": result.tensors,
        "tensor_bytes": result.tensor_bytes,
        "dtypes": result.dtypes,
        "dropped": list(result.dropped),
    }
    data = manifest.build(plan.source, plan.options.recorded(), files, summary)
    record = write_bytes(Location(plan.target.work_url), manifest.MANIFEST, data)
    finalize(plan.target, (*files, record))
    return ConvertResult(
        plan.target.dst_url, result, (*files, record), f"published {plan.target.dst_url}"
    )


def convert(
    src_url: str,
    dst_url: str,
    options: ConvertOptions | None = None,
    on_bytes: OnBytes | None = None,
    workers: int = 2,
    wait_seconds: float | None = None,
) -> ConvertResult:
    """The whole pipeline in this process; shards are written and verified on a thread pool."""
    return run_plan(
        plan_conversion(src_url, dst_url, options or ConvertOptions()),
        on_bytes,
        workers,
        wait_seconds,
    )


def run_plan(
    plan: ConversionPlan,
    on_bytes: OnBytes | None = None,
    workers: int = 2,
    wait_seconds: float | None = None,
) -> ConvertResult:
    dst = plan.target.dst_url
    nothing = ConvertResult(dst, None, (), f"{dst} already holds this conversion: nothing to do")
    if plan.already_done:
        return nothing
    try:
        with lock(plan, wait_seconds):
            if not still_needed(plan):
                return nothing
            start(plan)
            try:
                with ThreadPoolExecutor(max_workers=workers) as pool:
                    numbers = range(len(plan.shards))
                    files = list(pool.map(lambda i: write_shard(plan, i, on_bytes), numbers))
                    files += write_index(plan) + copy_assets(plan)
                    checks = list(pool.map(lambda i: verify_one(plan, i, on_bytes), numbers))
                return publish(plan, files, report(plan, checks, len(files) - len(checks)))
            except BaseException as e:
                abandon(plan.target, e)
                raise
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        raise retry.explain(e, dst) from e
