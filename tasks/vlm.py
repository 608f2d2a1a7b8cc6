"""Thin Prefect tasks over the VLM split / train / merge / test steps (URLs in, small results out)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from ckpt_core.dtypes import TargetDtype
from ckpt_core.io.storage import Location
from ckpt_core.proof.test_model import DEFAULT_PROMPTS, TestDevice, markdown, run_test_model
from ckpt_core.vlm import merge as vlm_merge
from ckpt_core.vlm import split as vlm_split
from ckpt_core.vlm import tiny_trainer
from tasks.common import IO_RETRIES
from tasks.runs import artifact_key

# Training fails for reasons a rerun can fix (preempted node, OOM spike, flaky storage), and
# also for ones it cannot; the flow sets the count (`train_retries`) and reports the last error.
TRAIN_RETRIES: dict[str, Any] = {"retries": 2, "retry_delay_seconds": 5}


@task(name="split", cache_policy=NO_CACHE, **IO_RETRIES)
def split(model: str, split_dir: str, *, overwrite: bool = False) -> dict[str, Any]:
    return asdict(vlm_split.split(model, split_dir, overwrite=overwrite))


@task(name="train", cache_policy=NO_CACHE, **TRAIN_RETRIES)
def train(
    split_dir: str,
    train_dir: str,
    *,
    parallel_size: int,
    command: str | None = None,
    steps: int = 2,
    timeout_seconds: float | None = None,
) -> dict[str, Any]:
    """The user's command when given (killed after `timeout_seconds`), else the built-in tiny
    trainer."""
    if command:
        result = tiny_trainer.run_train_command(
            command, split_dir, train_dir, parallel_size, timeout_s=timeout_seconds
        )
    else:
        result = tiny_trainer.train(split_dir, train_dir, parallel_size, steps=steps)
    print(f"trained: {result.steps} steps on {result.parallel_size} ranks, losses {result.losses}")
    return asdict(result)


def finished_training(train_dir: str, parallel_size: int) -> dict[str, Any] | None:
    """A previous train step's result in `train_dir`, when it finished: `metadata.json` (which
    a trainer writes last) for `parallel_size` ranks, and every part's rank files."""
    out = Location(train_dir)
    if not out.exists(tiny_trainer.METADATA):
        return None
    meta: dict[str, Any] = json.loads(out.read_text(tiny_trainer.METADATA))
    if int(meta.get("parallel_size", -1)) != parallel_size:
        return None
    parts = [p for p, v in meta.items() if isinstance(v, dict) and "parallel_size" in v]
    files = [f"{p}/rank_{r}.pt" for p in parts for r in range(parallel_size)]
    if not parts or not all(out.exists(f) for f in files):
        return None
    return asdict(
        tiny_trainer.TrainResult(
            train_dir,
            parallel_size,
            int(meta.get("steps", 0)),
            [float(x) for x in meta.get("losses", [])],
            files,
        )
    )


@task(name="merge", cache_policy=NO_CACHE, **IO_RETRIES)
def merge(
    train_dir: str,
    merged_dir: str,
    model: str,
    *,
    output_format: vlm_merge.OutputFormat = "safetensors",
    dtype: TargetDtype = "keep",
    overwrite: bool = False,
) -> dict[str, Any]:
    result = vlm_merge.merge(
        train_dir, merged_dir, model, output_format=output_format, dtype=dtype, overwrite=overwrite
    )
    return asdict(result)


@task(name="test", cache_policy=NO_CACHE)
def test(
    merged_dir: str,
    model: str,
    *,
    prompts: list[str] | None = None,
    max_new_tokens: int = 16,
    device: TestDevice = "auto",
) -> dict[str, Any]:
    """`ckptflow test-model`'s logic on the merged model (strict load, seeded greedy generation,
    timings), after the merge's own check against the base (strict keys, finite logits)."""
    found = vlm_merge.check_merged(merged_dir, model)
    generated = run_test_model(
        merged_dir,
        prompts=prompts or DEFAULT_PROMPTS,
        max_new_tokens=max_new_tokens,
        device=device,
    )
    rows = "\n".join(f"| {k} | {v} |" for k, v in found.items())
    create_markdown_artifact(
        key=artifact_key("post-training-test", merged_dir),
        markdown=f"## post_training test\n\n| item | value |\n| --- | --- |\n{rows}\n\n"
        f"## test-model\n\n{markdown(generated)}\n\n```json\n"
        f"{json.dumps(generated, indent=2)}\n```\n",
    )
    return {**found, "test_model": generated}
