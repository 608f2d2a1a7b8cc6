"""The `post_training` flow: split -> train -> merge -> test, one task per step.

Train runs the user's command (`train_command`, given the split and output directories) or,
without one, the built-in tiny trainer. Work directories default to children of `work_dir`:
`split/`, `train/`, `merged/`. A rerun skips the steps that finished: the same split (its
`split_metadata.json`), a training of that split (`metadata.json`, written last, and every rank
file) and its merge (`_SUCCESS` and a manifest of the same inputs) are recognised and kept.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from ckpt_core.dtypes import TargetDtype
from ckpt_core.io.storage import join_url
from ckpt_core.vlm.merge import OutputFormat
from tasks import vlm as steps
from tasks.common import with_controls
from tasks.runs import flag_names, reported, run_logs, short


def run_name() -> str:
    given = flow_run.parameters
    return f"post_training: {short(str(given['model']))} -> {short(str(given['work_dir']))}"


# The `ckptflow split/merge/pipeline` flags in the library's messages, as this flow's parameters.
FLAGS = flag_names(
    ["parallel_size", "dtype", "overwrite", "train_command"],
    model_name="model",
    format="output_format",
    work_dir="work_dir",
    output_dir="work_dir",  # split/, train/ and merged/ are children of work_dir
    split_dir="work_dir",
    checkpoint_dir="work_dir",
    retry_delay="train_retry_delay_seconds",
)


@flow(name="post_training", flow_run_name=run_name, log_prints=True)
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
    train_timeout_seconds: float | None = None,
    step_timeout_seconds: float | None = None,
    test_prompts: list[str] | None = None,
    test_max_new_tokens: int = 16,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Split the HF VLM at `model`, train its parts, merge the rank files back, test the result.
    A rerun skips the steps already done.

    Args:
        model: The HF vision-language model directory (Qwen2.5-VL) to post-train.
        work_dir: Where split/, train/ and merged/ are written.
        train_command: Your training command; {split_dir}, {output_dir} and {parallel_size}
            are filled in. Empty: the built-in tiny trainer.
        parallel_size: Tensor-parallel ranks the training writes.
        steps_per_rank: Steps of the built-in tiny trainer.
        output_format: The merged model's files: safetensors or bin.
        dtype: The merged model's dtype (keep: as trained).
        train_retries: How often a failed training is tried again.
        train_retry_delay_seconds: Wait between training tries.
        train_timeout_seconds: Time limit of one training try (your command is killed);
            empty: none.
        step_timeout_seconds: Time limit of split, merge and test each; empty:
            CKPTFLOW_TASK_TIMEOUT_SECONDS (default 6 h).
        test_prompts: Prompts the test step generates from (seeded, greedy), as
            `ckptflow test-model --prompt`; empty: test-model's defaults.
        test_max_new_tokens: Tokens the test step generates per prompt.
        overwrite: Redo every step, replacing what an earlier run left.
    """
    split_dir = join_url(work_dir, "split")
    train_dir = join_url(work_dir, "train")
    merged_dir = join_url(work_dir, "merged")
    with run_logs(), reported(FLAGS, work_dir=work_dir, model=model):
        split = with_controls(steps.split, timeout_seconds=step_timeout_seconds)
        done = split(model, split_dir, overwrite=overwrite)
        verb = "already split" if done["skipped"] else "split"
        print(f"{verb} {model} -> {split_dir}: {done['counts']} tensors (layout {done['layout']})")
        trained = None
        if done["skipped"] and not overwrite:
            trained = steps.finished_training(train_dir, parallel_size)
        if trained is not None:
            print(f"already trained: {train_dir} ({parallel_size} ranks); training skipped")
        else:
            train = steps.train.with_options(
                retries=train_retries,
                retry_delay_seconds=train_retry_delay_seconds,
                timeout_seconds=_task_limit(train_timeout_seconds, train_command),
            )
            trained = train(
                split_dir,
                train_dir,
                parallel_size=parallel_size,
                command=train_command,
                steps=steps_per_rank,
                timeout_seconds=train_timeout_seconds,
            )
        merge = with_controls(steps.merge, timeout_seconds=step_timeout_seconds)
        merged = merge(
            train_dir,
            merged_dir,
            model,
            output_format=output_format,
            dtype=dtype,
            overwrite=overwrite,
        )
        print(f"merge: {merged['message']}")
        test = with_controls(steps.test, timeout_seconds=step_timeout_seconds, retries=False)
        tested = test(merged_dir, model, prompts=test_prompts, max_new_tokens=test_max_new_tokens)
    print(f"test: {tested}")
    return {"split": done, "train": trained, "merge": merged, "test": tested}


def _task_limit(seconds: float | None, command: str | None) -> float | None:
    """The train task's limit: the built-in trainer's is the limit itself; a command is killed
    at its limit by the step, and the task's leaves it the time to stop and report."""
    if seconds is None or not command:
        return seconds
    return seconds + 30
