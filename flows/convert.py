"""The `convert` flow: detect -> plan -> write shards (parallel) -> index and assets -> verify
(parallel) -> publish -> report artifact. Same steps, same bytes as `ckptflow convert`; the
run around them (lock, start, keep-or-discard on failure) is the one `ckpt_core.pipeline.run`
gives every front end."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from prefect import Flow, flow, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from ckpt_core.dtypes import TargetDtype
from ckpt_core.formats.peft_adapter import LoraMode
from ckpt_core.pipeline.checkpoints import resolve_checkpoint
from ckpt_core.pipeline.conversion import ConvertFlags, Device, ModelChoice, OutputFormat
from ckpt_core.pipeline.convert import report
from ckpt_core.pipeline.run import conversion_run
from tasks import convert as steps


@flow(name="convert", task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=True)  # type: ignore[arg-type]
def convert_flow(
    src: str,
    dst: str,
    *,
    dtype: TargetDtype | None = None,  # None: the default of `to` (bf16 for hf)
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
    """Convert the checkpoint at `src` (any fsspec URL) into a HF directory at `dst`; the
    options are `ckptflow convert`'s flags. `wait_seconds`: how long to wait for another run
    writing `dst` (default CKPTFLOW_LOCK_WAIT_SECONDS, else fail at once naming it)."""
    # The parameters after the URLs are ConvertFlags' fields by name (test_front_ends checks).
    given = locals()
    flags = ConvertFlags(**{f.name: given[f.name] for f in fields(ConvertFlags)})
    src = resolve_checkpoint(src, latest=latest)  # the manifest names the checkpoint converted
    conversion = steps.plan(src, dst, flags.options())
    # The flow run holds the destination from start to publish; tasks may run anywhere.
    with conversion_run(conversion, wait_seconds=wait_seconds) as needed:
        if not needed:
            print(f"{dst} already holds this conversion: nothing to do")
            return {"dst": dst, "published": False, "already_done": True}
        for warning in conversion.warnings:
            print(f"warning: {warning}")
        numbers = list(range(len(conversion.shards)))
        files = [f.result() for f in steps.write_shard.map(unmapped(conversion), numbers)]
        files += steps.write_index_and_assets(conversion)
        checks = [f.result() for f in steps.verify_shard.map(unmapped(conversion), numbers)]
        verified = report(conversion, checks, len(files) - len(checks))
        steps.report_artifact(conversion, verified)
        result = steps.publish(conversion, files, verified)
    print(f"{result.message}\n{verified.text()}")
    # `files` as the report counts them: the files manifest.json lists (itself not included)
    return {"dst": dst, "published": True, "tensors": verified.tensors, "files": verified.files}


def convert_flow_with(workers: int) -> Flow[..., dict[str, Any]]:
    """The flow with `workers` task threads writing and verifying shards (`ckptflow convert
    --prefect --workers N`); for many machines, swap in prefect-dask's DaskTaskRunner."""
    runner = ThreadPoolTaskRunner(max_workers=workers)  # type: ignore[var-annotated]
    return convert_flow.with_options(task_runner=runner)  # type: ignore[arg-type]
