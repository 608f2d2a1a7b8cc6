"""Thin Prefect tasks over ckpt_core.pipeline.convert's steps: each passes the small plan, never
tensors. The run around them (lock, start, keep-or-discard) is `ckpt_core.pipeline.run`'s."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from ckpt_core.pipeline import convert as core
from ckpt_core.pipeline.checkpoints import resolve_checkpoint
from ckpt_core.pipeline.conversion import ConversionPlan, ConvertOptions, ConvertResult
from ckpt_core.pipeline.verify import Report, ShardCheck
from ckpt_core.pipeline.writer import FileRecord
from tasks.common import IO_RETRIES
from tasks.runs import artifact_key


def _shard_run_name(verb: str) -> Any:
    """A task run name per shard (`write model-00002-of-00004.safetensors`)."""

    def name(parameters: dict[str, Any]) -> str:
        conversion: ConversionPlan = parameters["conversion"]
        return f"{verb} {conversion.shards[parameters['shard_number']].filename}"

    return name


@task(name="plan", cache_policy=NO_CACHE, **IO_RETRIES)
def plan(src: str, dst: str, options: ConvertOptions, *, latest: bool = False) -> ConversionPlan:
    """The plan; with `latest`, of the newest checkpoint-N under `src` (which the manifest
    names). Reading the source happens here, in a task, so a storage outage is retried."""
    return core.plan_conversion(resolve_checkpoint(src, latest=latest), dst, options)


@task(
    name="write-shard", task_run_name=_shard_run_name("write"), cache_policy=NO_CACHE, **IO_RETRIES
)
def write_shard(conversion: ConversionPlan, shard_number: int) -> FileRecord:
    return core.write_shard(conversion, shard_number)


@task(name="write-index-and-assets", cache_policy=NO_CACHE, **IO_RETRIES)
def write_index_and_assets(conversion: ConversionPlan) -> list[FileRecord]:
    return core.write_index(conversion) + core.copy_assets(conversion)


@task(
    name="verify-shard",
    task_run_name=_shard_run_name("verify"),
    cache_policy=NO_CACHE,
    **IO_RETRIES,
)
def verify_shard(conversion: ConversionPlan, shard_number: int) -> ShardCheck:
    return core.verify_one(conversion, shard_number)


@task(name="publish", cache_policy=NO_CACHE, **IO_RETRIES)
def publish(conversion: ConversionPlan, files: list[FileRecord], report: Report) -> ConvertResult:
    return core.publish(conversion, files, report)


@task(name="report-artifact", cache_policy=NO_CACHE)
def report_artifact(
    conversion: ConversionPlan, report: Report, published: ConvertResult | None, failure: str = ""
) -> None:
    """The verification report on the flow run's Artifacts tab, written once publish has
    happened (or failed): it says what was published, or why nothing was."""
    dst = conversion.target.dst_url
    if published is not None:
        outcome = f"published `{dst}`: {published.message}"
    else:
        outcome = f"nothing was published to `{dst}`: {failure}"
    table = [{"item": "published", "value": "yes" if published else "no"}, *report.rows()]
    create_table_artifact(
        key=artifact_key("convert-report", dst),
        table=table,
        description=f"{conversion.src_url} -> {dst}: {report.verdict}",
    )
    create_markdown_artifact(
        key=artifact_key("convert-summary", dst),
        markdown=f"## ckptflow convert\n\n`{conversion.src_url}` -> `{dst}` "
        f"({conversion.format}, {conversion.options.dtype})\n\n**{outcome}**\n\n"
        f"{report.markdown()}\n",
        description=outcome,
    )
