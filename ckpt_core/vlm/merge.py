"""Merge a disaggregated VLM run's tensor-parallel rank files back into one HF model.

The `tp-ranks` reader turns the EPOCH_DIR into a lazy index of the full model under the
names the installed transformers saves; the convert pipeline then streams it into sharded
safetensors (or, with `output_format="bin"`, the old single `pytorch_model.bin`), copies
config/tokenizer/processor files from the base, verifies every tensor against the reader
and publishes atomically, in the run loop every conversion shares (`pipeline.run`: one
writer per output, finished shards kept for a rerun). `merge_metadata.json` is written into
the output before the publish, so the manifest covers it. dtype "keep" by default: the
round trip is exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

import ckpt_core
from ckpt_core.dtypes import TargetDtype
from ckpt_core.errors import UsageError, VerifyError
from ckpt_core.formats.protocol import OpenOptions
from ckpt_core.formats.torchzip import LazyTorchFile, iter_tensors
from ckpt_core.io.storage import Location
from ckpt_core.pipeline import convert as conv
from ckpt_core.pipeline.conversion import ConversionPlan, ConvertOptions, Device
from ckpt_core.pipeline.device import chunk_source, read_whole
from ckpt_core.pipeline.run import conversion_run
from ckpt_core.pipeline.verify import ShardCheck, identical
from ckpt_core.pipeline.writer import FileRecord, hash_file, write_bytes

MERGE_METADATA = "merge_metadata.json"
BIN_FILE = "pytorch_model.bin"
OutputFormat = Literal["safetensors", "bin"]
OUTPUT_FORMATS: tuple[OutputFormat, ...] = get_args(OutputFormat)


@dataclass(frozen=True)
class MergeResult:
    output_url: str
    tensors: int
    output_format: OutputFormat
    message: str
    skipped: bool = False


def merge(
    checkpoint_url: str,
    output_url: str,
    base_url: str,
    *,
    parallel_size: int | None = None,
    output_format: OutputFormat = "safetensors",
    dtype: TargetDtype = "keep",
    max_shard_bytes: int = 5 * 10**9,
    overwrite: bool = False,
    workers: int = 2,
    wait_seconds: float | None = None,
    device: Device = "cpu",
) -> MergeResult:
    """`wait_seconds`: how long to wait for another run writing `output_url` (default: fail at
    once naming it); a merge killed halfway keeps its finished shards for the next run.
    `device`: where the rank pieces are merged and cast (pipeline/device.py); same bytes."""
    if output_format not in OUTPUT_FORMATS:
        raise UsageError(
            f"unknown --format {output_format!r}: choose {' or '.join(OUTPUT_FORMATS)}"
        )
    options = ConvertOptions(
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        base=base_url,
        overwrite=overwrite,
        open_options=OpenOptions(base=base_url, parallel_size=parallel_size),
        format="tp-ranks",
        device=device,
    )
    plan = conv.plan_conversion(checkpoint_url, output_url, options)
    with conversion_run(plan, wait_seconds=wait_seconds) as needed:
        if not needed:
            return MergeResult(output_url, plan.tensor_count, output_format, "already merged", True)
        if output_format == "bin":
            files, checks = _write_bin(plan)
            files += conv.copy_assets(plan)
        else:
            files, checks = conv.write_and_verify(plan, workers=workers)
        files.append(_write_metadata(plan, output_format, checkpoint_url, base_url))
        report = conv.report(plan, checks, len(files) - len(checks))
        result = conv.publish(plan, files, report)
    return MergeResult(output_url, plan.tensor_count, output_format, result.message)


def _write_bin(plan: ConversionPlan) -> tuple[list[FileRecord], list[ShardCheck]]:
    """The old single-file layout: the whole state dict goes through one torch.save, so this
    path holds the model in memory (the format allows nothing else); safetensors streams."""
    reader = conv.reader_for(plan)
    names = [n for s in plan.shards for n in s.tensors]
    index = reader.index()
    placed = chunk_source(plan.options.device)  # the writer's side; the check below is the host's

    def produce(name: str) -> torch.Tensor:
        return reader.read(name).to(getattr(torch, plan.dtypes[name]))

    def produce_placed(name: str) -> torch.Tensor:
        dtype = getattr(torch, plan.dtypes[name])
        return read_whole(placed(reader, index[name], dtype), index[name], dtype)

    work = Location(plan.target.work_url)
    with work.fs.open(work.file(BIN_FILE), "wb") as handle:
        torch.save({n: produce_placed(n) for n in names}, handle)
    record = hash_file(work, BIN_FILE)
    written = dict(iter_tensors(LazyTorchFile(work, BIN_FILE).obj))
    if set(written) != set(names):
        raise VerifyError(f"{work.file(BIN_FILE)}: holds other tensors than planned")
    mismatches = tuple(n for n in names if not identical(written[n].materialize(), produce(n)))
    dtypes: dict[str, int] = {}
    for n in names:
        dtypes[plan.dtypes[n]] = dtypes.get(plan.dtypes[n], 0) + 1
    total = sum(written[n].nbytes for n in names)
    return [record], [ShardCheck(len(names), total, dtypes, mismatches, BIN_FILE)]


def _write_metadata(
    plan: ConversionPlan, output_format: OutputFormat, checkpoint_url: str, base_url: str
) -> FileRecord:
    import transformers

    reader: Any = conv.reader_for(plan)
    facts = reader.facts()
    metadata = {
        "checkpoint": checkpoint_url,
        "base": base_url,
        "model_type": getattr(reader, "family", None) and reader.family.model_type,
        "parallel_sizes": getattr(reader, "sizes", {}),
        "layout_written": getattr(reader, "layout", None),
        "output_format": output_format,
        "dtype": plan.options.dtype,
        "tensors": plan.tensor_count,
        "rank_files": facts.files,
        "left_out": list(plan.dropped),
        "notes": facts.notes,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "ckptflow_version": ckpt_core.__version__,
    }
    data = (json.dumps(metadata, indent=2) + "\n").encode()
    return write_bytes(Location(plan.target.work_url), MERGE_METADATA, data)


def check_merged(model_url: str, base_url: str | None = None, seed: int = 0) -> dict[str, Any]:
    """The pipeline's test step: load strictly with transformers, run a forward, compare.

    Returns what it found (keys, finite logits, timings, how far the weights moved from the
    base); raises VerifyError when a key is missing/unexpected or the logits are not finite.
    """
    import time

    import transformers

    from ckpt_core.families import family_for, load_config

    root = Location(model_url)
    if not root.is_local:
        raise UsageError(f"{model_url}: the test step loads with transformers: needs a local path")
    config = load_config(root)
    family = family_for(config, root.file("config.json"))
    model_class = getattr(transformers, family.model_class)
    started = time.perf_counter()
    model, info = model_class.from_pretrained(root.path, output_loading_info=True)
    load_s = time.perf_counter() - started
    problems = {
        k: sorted(info.get(k, [])) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    if any(problems.values()):
        raise VerifyError(f"{model_url}: does not load strictly: {problems}")
    batch = family.demo_batch(model.config, seed)
    batch.pop("labels", None)
    started = time.perf_counter()
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    result: dict[str, Any] = {
        "model": model_url,
        "load_seconds": round(load_s, 3),
        "forward_seconds": round(time.perf_counter() - started, 3),
        "logits_shape": list(logits.shape),
        "finite": bool(torch.isfinite(logits).all()),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if not result["finite"]:
        raise VerifyError(f"{model_url}: the merged model's logits are not finite")
    if base_url is not None and Location(base_url).is_local:
        base = model_class.from_pretrained(Location(base_url).path)
        ours, theirs = model.state_dict(), base.state_dict()
        result["tensors_changed_vs_base"] = sum(
            not torch.equal(ours[k], theirs[k]) for k in ours if k in theirs
        )
        result["tensors"] = len(ours)
    return result
