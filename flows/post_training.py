"""The `post_training` flow: split -> train -> merge -> test, one task per step.

Train runs the user's command (`train_command`, given the split and output directories) or,
without one, the built-in tiny trainer. Work directories default to children of `work_dir`:
`split/`, `train/`, `merged/`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from ckpt_core.dtypes import TargetDtype
from ckpt_core.io.storage import join_url
from ckpt_core.vlm.merge import OutputFormat
from tasks import vlm as steps


@flow(name="post_training", log_prints=True)
def post_training(
    model: str,
    work_dir: str,
    *,
    train_command: str | None = None,
    parallel_size: int = 2,
    steps_per_rank: int = 2,
    output_format: OutputFormat = "safetensors",
    dtype: TargetDtype = "keep",
    train_retries: int = 2,
    train_retry_delay_seconds: float = 5,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Split the HF VLM at `model`, train its parts, merge the rank files back, test the result."""
    split_dir = join_url(work_dir, "split")
    train_dir = join_url(work_dir, "train")
    merged_dir = join_url(work_dir, "merged")
    split = steps.split(model, split_dir, overwrite=overwrite)
    print(f"split {model} -> {split_dir}: {split['counts']} tensors (layout {split['layout']})")
    train = steps.train.with_options(
        retries=train_retries, retry_delay_seconds=train_retry_delay_seconds
    )
    trained = train(
        split_dir,
        train_dir,
        parallel_size=parallel_size,
        command=train_command,
        steps=steps_per_rank,
    )
    merged = steps.merge(
        train_dir, merged_dir, model, output_format=output_format, dtype=dtype, overwrite=overwrite
    )
    print(f"merge: {merged['message']}")
    tested = steps.test(merged_dir, model)
    print(f"test: {tested}")
    return {"split": split, "train": trained, "merge": merged, "test": tested}
