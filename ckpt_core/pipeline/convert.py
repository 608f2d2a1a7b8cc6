"""The convert pipeline as plain steps: plan -> write shards -> index -> assets -> verify -> publish.

Each step takes the small, picklable `ConversionPlan` (URLs and names, never tensors), so the
CLI runs them in-process and the Prefect flow runs the same functions as tasks. The run
around them (lock, start, abandon-or-keep on failure) is `ckpt_core.pipeline.run`'s.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import torch

from ckpt_core.dtypes import itemsize, output_dtype, parse_target
from ckpt_core.errors import FormatError, SourceChangedError, VerifyError
from ckpt_core.formats.protocol import Reader
from ckpt_core.io import retry
from ckpt_core.io.stage import remote_stamp, stage_source
from ckpt_core.io.storage import Location
from ckpt_core.pipeline import manifest
from ckpt_core.pipeline.assets import copy_asset
from ckpt_core.pipeline.conversion import ConversionPlan, ConvertOptions, ConvertResult
from ckpt_core.pipeline.device import DeviceStream, placement_for
from ckpt_core.pipeline.lora import output_files
from ckpt_core.pipeline.modelcheck import check_model
from ckpt_core.pipeline.multi_model import plan_models
from ckpt_core.pipeline.partial import left_out_names
from ckpt_core.pipeline.plan import index_jsons, plan_shards
from ckpt_core.pipeline.publish import (
    check_destination,
    discard,
    ensure_unfinished,
    finalize,
    finished,
    record_done,
    refuse_inside,
    target_for,
)
from ckpt_core.pipeline.run import conversion_run, start
from ckpt_core.pipeline.source import open_source
from ckpt_core.pipeline.stream import ChunkBuffers, release_freed_memory, source_chunks
from ckpt_core.pipeline.targets import (
    check_flags,
    plan_training,
    verify_training,
    write_training,
    write_training_index,
)
from ckpt_core.pipeline.verify import Report, ShardCheck, combine, verify_shard
from ckpt_core.pipeline.writer import FileRecord, write_bytes, write_safetensors

__all__ = [
    "ConversionPlan",
    "ConvertOptions",
    "ConvertResult",
    "convert",
    "copy_assets",
    "plan_conversion",
    "publish",
    "reader_for",
    "report",
    "run_plan",
    "start",
    "verify_one",
    "write_and_verify",
    "write_index",
    "write_shard",
]

OnBytes = Callable[[int], None]


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
    reader, _ = open_source(plan.reader_url, plan.options, format_name=plan.format)
    check_source_unchanged(plan, reader)  # another worker: the very files the plan was made from
    _remember(key, reader)
    return reader


def check_source_unchanged(plan: ConversionPlan, reader: Reader) -> None:
    """The source files still have the sizes and modification stamps they had at planning."""
    now = source_fingerprint(reader, plan.src_url, plan.reader_url)
    if now != plan.source["fingerprint"]:
        raise SourceChangedError(
            f"{plan.src_url}: the source checkpoint changed while it was being converted "
            "(is training still writing it?); nothing was published: run the conversion again"
        )


def plan_conversion(src_url: str, dst_url: str, options: ConvertOptions) -> ConversionPlan:
    src, dst = Location(src_url), Location(dst_url)
    _refuse_unbuilt(options)
    refuse_inside(dst, src, "source checkpoint")
    if options.base:
        refuse_inside(dst, Location(options.base), "base model")
    read_url = stage_source(src_url, options.cache_dir) if options.cache_dir else src_url
    reader, opened = open_source(read_url, options)
    files = output_files(reader, opened)
    models = plan_models(reader, opened, where=src_url)  # BAGEL main/EMA; None: one model
    if models is not None:
        files = replace(files, assets=models.assets)
    if not files.is_model:  # --lora keep: an adapter directory, no model rules apply
        opened = replace(opened, config=None)
    config = opened.config
    index = dict(reader.index())
    if not index:
        raise FormatError(f"{src_url}: the checkpoint holds no tensors")
    # Before anything is written; several models are checked against the base's weight files.
    checked = models.check if models else check_model(reader, opened, where=src_url)
    dropped = set(checked.dropped)
    target_dtype = parse_target(options.dtype)
    out = {
        n: output_dtype(info.dtype, target_dtype) for n, info in index.items() if n not in dropped
    }

    def out_bytes(name: str) -> int:
        return index[name].numel * itemsize(out[name])

    sources: dict[str, str] = {}
    if options.to != "hf":  # the model's own state dict, in one DCP or .pth file
        several = models is not None or not files.is_model
        training = plan_training(index, opened, target_dtype, several_models=several)
        out, shards, sources = dict(training.dtypes), list(training.shards), training.sources
        dropped = set()  # a strict load needs the tied copies that save_pretrained leaves out
    elif models is not None:
        shards = models.shards(list(out), out_bytes, files.max_shard_bytes)
    else:
        shards = plan_shards(list(out), out_bytes, files.max_shard_bytes, files.pattern)
    facts = reader.facts()
    source = {
        "url": src_url,
        "format": opened.format,
        "fingerprint": source_fingerprint(reader, src_url, read_url),
        "notes": list(facts.notes) + list(models.notes if models else ()),
        "keys": checked.keys,
    }
    target = target_for(dst, overwrite=options.overwrite)
    done = check_destination(dst, manifest.identity(source, options.recorded()), options.overwrite)
    warnings = (
        ()
        if config or not files.is_model
        else (
            "no config.json in the source or --base: the output holds weights, index and manifest only; "
            "pass --base DIR (the HF model the checkpoint was trained from) to add config and tokenizer",
        )
    )
    plan = ConversionPlan(
        src_url,
        opened.format,
        options,
        target,
        tuple(shards),
        {n: str(d).removeprefix("torch.") for n, d in out.items()},
        files.assets,
        tuple(sorted(dropped)),
        source,
        warnings,
        done,
        read_url,
        left_out=left_out_names(read_url, options, opened.format, index),
        sources=sources,
    )
    _remember(_reader_key(plan), reader)
    return plan


def _refuse_unbuilt(options: ConvertOptions) -> None:
    """Flags the CLI and flow already take but this version does not carry out yet."""
    check_flags(options)  # --to dcp/pth and their flags
    placement_for(options.device)  # --device cuda where CUDA is not usable: one line, now


# Tests only: slows every tensor so that a test can kill a run at a chosen point.
_TEST_DELAY_ENV = "CKPTFLOW_TEST_DELAY_PER_TENSOR_SECONDS"


def _chunks(
    plan: ConversionPlan,
    *,
    check_overflow: bool = False,
    prefix: str = "",
    on_device: bool = False,
    buffers: ChunkBuffers | None = None,
) -> Callable[[str], Iterator[torch.Tensor]]:
    """Source tensors as bounded flat chunks, cast to their output dtype, in reused buffers
    (one stream: the writer's or the verifier's prefetch loop). Only the writer checks casts
    for overflow (`check_overflow`): the verifier re-casts what the writer already let through.
    `on_device`: merged and cast where `--device` says (the writer); the verifier stays on the
    host path, so a device run is checked byte for byte against the CPU's own cast."""
    release_freed_memory()  # every process that writes or verifies: CLI, flow workers, benches
    reader = reader_for(plan)
    index = reader.index()
    if buffers is None:  # --to dcp/pth hands in its own: chunks read straight into place
        buffers = ChunkBuffers()
    placement = placement_for(plan.options.device) if on_device else None
    device = DeviceStream(placement) if placement is not None else None
    delay = float(os.environ.get(_TEST_DELAY_ENV, "0") or 0)

    def chunks(name: str) -> Iterator[torch.Tensor]:
        name = prefix + name  # a shard of one of several models: the reader's name
        if delay:
            time.sleep(delay)
        if device is not None:
            dtype = getattr(torch, plan.dtypes[name])
            return device.chunks(
                reader, index[plan.source_of(name)], dtype, check_overflow=check_overflow
            )
        return source_chunks(
            reader,
            index[plan.source_of(name)],  # --to dcp/pth: a tied copy reads what it repeats
            getattr(torch, plan.dtypes[name]),
            buffers=buffers,
            check_overflow=check_overflow,
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
    index, prefix = reader_for(plan).index(), shard.source_prefix
    layout = [
        (n, getattr(torch, plan.dtypes[prefix + n]), index[plan.source_of(prefix + n)].shape)
        for n in shard.tensors
    ]

    def chunks_into(buffers: ChunkBuffers | None = None) -> Callable[[str], Iterator[torch.Tensor]]:
        check = not plan.options.allow_overflow
        return _chunks(plan, check_overflow=check, prefix=prefix, on_device=True, buffers=buffers)

    def attempt() -> FileRecord:
        ensure_unfinished(plan.target)
        if plan.options.to != "hf":  # DCP or .pth: that format's own writer (targets.py)
            return write_training(plan, layout, chunks_into, on_bytes)
        chunks = chunks_into()
        return write_safetensors(work, shard.filename, layout, chunks, on_bytes)

    record = retry.call(work.file(shard.filename), attempt)
    ensure_unfinished(plan.target)
    record_done(work, record)
    return record


def write_index(plan: ConversionPlan) -> list[FileRecord]:
    """The index of each sharded model (one, or BAGEL's model and ema each their own)."""
    ensure_unfinished(plan.target)  # still this run's destination (the lock's fencing token)
    if plan.options.to != "hf":
        return write_training_index(plan)  # DCP's .metadata
    work = Location(plan.target.work_url)
    return [
        write_bytes(work, name, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
        for name, index in index_jsons(plan.shards).items()
    ]


def copy_assets(plan: ConversionPlan) -> list[FileRecord]:
    ensure_unfinished(plan.target)
    work = Location(plan.target.work_url)
    return [copy_asset(work, a) for a in plan.assets]


def verify_one(
    plan: ConversionPlan, shard_number: int, on_bytes: OnBytes | None = None
) -> ShardCheck:
    if plan.options.to != "hf":  # re-read by ckptflow's own reader of that format
        return verify_training(plan, shard_number, _chunks(plan), on_bytes)
    return verify_shard(
        Location(plan.target.work_url),
        plan.shards[shard_number],
        _chunks(plan, prefix=plan.shards[shard_number].source_prefix),
        on_bytes,
    )


def report(plan: ConversionPlan, checks: Sequence[ShardCheck], other_files: int) -> Report:
    notes = list(plan.source["notes"]) + list(plan.warnings)
    return combine(
        checks,
        other_files,
        plan.dropped,
        notes,
        left_out=plan.left_out,
        keys=plan.source.get("keys", ""),
    )


def publish(plan: ConversionPlan, files: Sequence[FileRecord], result: Report) -> ConvertResult:
    """Manifest and marker, then into place; a failed verification publishes nothing."""
    try:
        check_source_unchanged(plan, reader_for(plan))
    except SourceChangedError:
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
        "partial": bool(result.left_out),  # --exclude-frozen: not loadable as the model alone
    }
    if result.left_out:
        summary["left_out"] = len(result.left_out)
        summary["left_out_names"] = list(result.left_out)
    data = manifest.build(plan.source, plan.options.recorded(), files, summary)
    ensure_unfinished(plan.target)
    record = write_bytes(Location(plan.target.work_url), manifest.MANIFEST, data)
    finalize(plan.target, (*files, record))
    return ConvertResult(
        plan.target.dst_url, result, (*files, record), f"published {plan.target.dst_url}"
    )


def write_and_verify(
    plan: ConversionPlan, *, workers: int = 2, on_bytes: OnBytes | None = None
) -> tuple[list[FileRecord], list[ShardCheck]]:
    """In this process: the shards on a thread pool, the index and the assets, then every shard
    verified on the pool. Returns the files written and the shards' checks."""
    numbers = range(len(plan.shards))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        files = list(pool.map(lambda i: write_shard(plan, i, on_bytes), numbers))
        files += write_index(plan) + copy_assets(plan)
        checks = list(pool.map(lambda i: verify_one(plan, i, on_bytes), numbers))
    return files, checks


def convert(
    src_url: str,
    dst_url: str,
    options: ConvertOptions | None = None,
    *,
    on_bytes: OnBytes | None = None,
    workers: int = 2,
    wait_seconds: float | None = None,
) -> ConvertResult:
    """The whole pipeline in this process; shards are written and verified on a thread pool."""
    plan = plan_conversion(src_url, dst_url, options or ConvertOptions())
    return run_plan(plan, on_bytes=on_bytes, workers=workers, wait_seconds=wait_seconds)


def run_plan(
    plan: ConversionPlan,
    *,
    on_bytes: OnBytes | None = None,
    workers: int = 2,
    wait_seconds: float | None = None,
) -> ConvertResult:
    with conversion_run(plan, wait_seconds=wait_seconds) as needed:
        if not needed:
            dst = plan.target.dst_url
            return ConvertResult(
                dst, None, (), f"{dst} already holds this conversion: nothing to do"
            )
        files, checks = write_and_verify(plan, workers=workers, on_bytes=on_bytes)
        return publish(plan, files, report(plan, checks, len(files) - len(checks)))
