"""The `convert` flow: detect -> plan -> write shards (parallel) -> index and assets -> verify
(parallel) -> publish -> report artifact. Same steps, same bytes as `ckptflow convert`; the
run around them (lock, start, keep-or-discard on failure) is the one `ckpt_core.pipeline.run`
gives every front end."""

from __future__ import annotations

import contextlib
from dataclasses import fields
from typing import Any
from uuid import UUID

from prefect import Flow, flow, tags, unmapped
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from ckpt_core.formats.peft_adapter import LoraMode
from ckpt_core.pipeline.conversion import (
    ConversionPlan,
    ConvertFlags,
    Device,
    DtypeFlag,
    ModelChoice,
    OutputFormat,
)
from ckpt_core.pipeline.convert import report
from ckpt_core.pipeline.run import conversion_run
from tasks import convert as steps
from tasks.common import with_controls
from tasks.runs import (
    artifact_key,
    destination_slot,
    flag_names,
    reported,
    run_logs,
    short,
    tag_run,
)


def run_name() -> str:
    """`convert: run1/global_step200 -> hf/run1-200`."""
    given = flow_run.parameters
    return f"convert: {short(str(given['src']))} -> {short(str(given['dst']))}"


@flow(
    name="convert",
    flow_run_name=run_name,
    task_runner=ThreadPoolTaskRunner(max_workers=2),  # type: ignore[arg-type]
    log_prints=True,
)
def convert_flow(
    src: str,
    dst: str,
    *,
    dtype: DtypeFlag = "default",
    max_shard_size: str = "5GB",
    base: str | None = None,
    strip_prefix: list[str] | None = None,
    latest: bool = False,
    overwrite: bool = False,
    tag: str | None = None,
    exclude_frozen: bool = False,
    allow_missing: list[str] | None = None,
    format: str | None = None,
    cache_dir: str | None = None,
    allow_overflow: bool = False,
    lora: LoraMode = "fuse",
    to: OutputFormat = "hf",
    models: ModelChoice = "both",
    dcp_key: str | None = None,
    stage: str | None = None,
    hidden_size: int | None = None,
    moe: bool = False,
    device: Device = "cpu",
    wait_seconds: float | None = None,
) -> dict[str, Any]:
    """Convert one checkpoint (any format ckptflow detects) and publish it, verified, at `dst`.
    The options are `ckptflow convert`'s flags; each task's time limit is
    CKPTFLOW_TASK_TIMEOUT_SECONDS (default 6 h).

    Args:
        src: The checkpoint: a local path or any fsspec URL (s3://bucket/run1/global_step200).
        dst: Where the converted checkpoint is published (a directory or URL prefix).
        dtype: Output dtype; default: the output format's (bf16 for hf, keep for dcp, fp16
            for pth).
        max_shard_size: Largest output shard, e.g. 5GB or 500MB.
        base: A HF model directory (config.json) to check names and shapes against, and the
            base model for LoRA fusing.
        strip_prefix: Name prefixes to strip from every tensor name (module., _orig_mod.).
        latest: src holds checkpoint-N directories: convert the newest.
        overwrite: Replace a different conversion already published at dst.
        tag: The checkpoint tag to read (DeepSpeed global_stepN) when src holds several.
        exclude_frozen: Leave out frozen parameters (the output is partial, said so).
        allow_missing: Tensor names the output may lack compared with base.
        format: The source format when detection should not decide (deepspeed, dcp, hf, ...).
        cache_dir: Copy a remote source here first and read it locally.
        allow_overflow: Allow values that become inf in the chosen dtype.
        lora: A PEFT adapter source: fuse into base, or keep as an adapter directory.
        to: Output format: hf (safetensors directory), dcp or pth.
        models: BAGEL-style sources: which models to write (main, ema or both).
        dcp_key: The state-dict key that holds the model in a DCP checkpoint.
        stage: to=pth: the training stage in the file name {stage}_{hidden_size}[_moe].pth.
        hidden_size: to=pth: the hidden size in the file name (default: the config's).
        moe: to=pth: add _moe to the file name.
        device: Where rank pieces are merged and cast (cpu, cuda, auto); same bytes.
        wait_seconds: How long to wait for another run writing dst (default:
            CKPTFLOW_LOCK_WAIT_SECONDS, else fail at once naming it).
    """
    # The parameters after the URLs are ConvertFlags' fields by name (test_front_ends checks).
    given = locals()
    flags = ConvertFlags(**{f.name: given[f.name] for f in fields(ConvertFlags)})
    with run_logs(), reported(FLAGS, dst=dst, src=src):
        conversion = with_controls(steps.plan)(src, dst, flags.options(), latest=latest)
        labels = (f"format:{conversion.format}", f"to:{to}", f"dtype:{conversion.options.dtype}")
        tag_run(*labels)
        # A manual run holds its destination's concurrency slot: a second run to the same dst
        # waits for it in Prefect; runs of a schedule (`watch`) are serialised by their own.
        slot = destination_slot(dst) if flow_run.parent_flow_run_id is None else None
        with slot or contextlib.nullcontext(), tags(*labels):
            return _run(conversion, wait_seconds)


def _run(conversion: ConversionPlan, wait_seconds: float | None) -> dict[str, Any]:
    dst = conversion.target.dst_url
    # The flow run holds the destination from start to publish; tasks may run anywhere.
    with conversion_run(conversion, wait_seconds=wait_seconds) as needed:
        if not needed:
            print(f"{dst} already holds this conversion: nothing to do")
            return {"dst": dst, "published": False, "already_done": True}
        for warning in conversion.warnings:
            print(f"warning: {warning}")
        numbers = list(range(len(conversion.shards)))
        progress = Progress(dst, 2 * len(numbers))
        write = with_controls(steps.write_shard).map(unmapped(conversion), numbers)
        files = progress.results(write)
        files += with_controls(steps.write_index_and_assets)(conversion)
        verify = with_controls(steps.verify_shard).map(unmapped(conversion), numbers)
        checks = progress.results(verify)
        verified = report(conversion, checks, len(files) - len(checks))
        try:
            result = with_controls(steps.publish)(conversion, files, verified)
        except Exception as e:  # a failed verification: the run fails with its report attached
            with_controls(steps.report_artifact, retries=False)(conversion, verified, None, str(e))
            raise
        with_controls(steps.report_artifact, retries=False)(conversion, verified, result)
    print(f"{result.message}\n{verified.text()}")
    # `files` as the report counts them: the files manifest.json lists (itself not included)
    return {"dst": dst, "published": True, "tensors": verified.tensors, "files": verified.files}


class Progress:
    """A progress artifact on the run: shards written and verified, updated per shard."""

    def __init__(self, dst: str, steps_total: int) -> None:
        self.done, self.total = 0, max(1, steps_total)
        made = create_progress_artifact(
            0.0, key=artifact_key("convert-progress", dst), description=f"shards of {dst}"
        )
        assert isinstance(made, UUID)  # sync in a sync flow (the decorator also allows async)
        self.id = made

    def results(self, futures: list[PrefectFuture[Any]]) -> list[Any]:
        """The futures' results in their order, counting each as it finishes."""
        for future in as_completed(futures):
            future.result()  # the first failure stops the run here (its shards are kept)
            self.done += 1
            update_progress_artifact(self.id, 100.0 * self.done / self.total)
        return [f.result() for f in futures]


# CLI flags in the library's messages, as this flow's parameters (`--base` -> `parameter base`).
FLAGS = flag_names(
    [f.name for f in fields(ConvertFlags)] + ["src", "dst", "wait_seconds"],
    wait_for_lock="wait_seconds",
)


def convert_flow_with(workers: int) -> Flow[..., dict[str, Any]]:
    """The flow with `workers` task threads writing and verifying shards (`ckptflow convert
    --prefect --workers N`); for many machines, swap in prefect-dask's DaskTaskRunner."""
    runner = ThreadPoolTaskRunner(max_workers=workers)  # type: ignore[var-annotated]
    return convert_flow.with_options(task_runner=runner)  # type: ignore[arg-type]
