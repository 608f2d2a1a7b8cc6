"""The `post_training` flow (split -> train -> merge -> test) on the Prefect test harness, the
`ckptflow pipeline` CLI with a failing train command (retried, then reported), and the
user-command train step without Prefect."""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt_core.errors import TrainCommandError
from ckpt_core.vlm.split import split
from ckpt_core.vlm.tiny_trainer import run_train_command
from tests.fixtures.tiny_vlm import save_tiny_vlm
from tests.helpers.cli_runs import tree
from tests.helpers.tiny_text import write_image_processor, write_tokenizer


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pt-base")
    save_tiny_vlm(path)
    # a real VLM's tokenizer (byte-level, chat template) and image processor: the test step
    # generates from an image and a prompt
    write_tokenizer(path)
    write_image_processor(path)
    return path


def test_user_train_command_gets_dirs_and_must_write_ranks(base: Path, tmp_path: Path) -> None:
    split(str(base), str(tmp_path / "split"))
    command = (
        f"{shlex.quote(sys.executable)} -m ckptflow.cli tiny-train --split-dir {{split_dir}} "
        "--output-dir {output_dir} --parallel-size {parallel_size} --steps 1"
    )
    result = run_train_command(command, str(tmp_path / "split"), str(tmp_path / "epoch"), 2)
    assert result.parallel_size == 2 and len(result.losses) == 1
    assert (tmp_path / "epoch" / "text" / "rank_1.pt").exists()
    quiet = f"{shlex.quote(sys.executable)} -c pass"
    with pytest.raises(TrainCommandError, match="wrote no metadata.json"):
        run_train_command(quiet, str(tmp_path / "split"), str(tmp_path / "nothing"), 2)


@pytest.mark.prefect
def test_post_training_flow_end_to_end(prefect_harness: None, base: Path, tmp_path: Path) -> None:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from flows.post_training import post_training

    words = {"test_prompts": ["Describe it."], "test_max_new_tokens": 4}
    outcome = post_training(
        str(base), str(tmp_path / "work"), parallel_size=2, steps_per_rank=2, **words
    )
    merged = tmp_path / "work" / "merged"
    assert (merged / "_SUCCESS").exists() and (merged / "merge_metadata.json").exists()
    assert outcome["split"]["counts"] == {"vision": 30, "text": 27}
    assert len(outcome["train"]["losses"]) == 2
    assert outcome["test"]["finite"] and outcome["test"]["tensors_changed_vs_base"] > 0
    generated = outcome["test"]["test_model"]  # test-model's JSON, on the merged model
    assert generated["image_input"] and generated["prompts"][0]["new_tokens"] > 0
    loaded: Any = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        merged, output_loading_info=True
    )
    model, info = loaded
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    original = Qwen2_5_VLForConditionalGeneration.from_pretrained(base)
    assert not torch.equal(model.lm_head.weight, original.lm_head.weight), (
        "the merged model should hold the trained weights"
    )

    # A rerun skips the finished steps: the same split, its training, its merge (no second
    # training that would then fail at merge), and tests the same merged model again.
    before = tree(tmp_path / "work")
    state = post_training(
        str(base), str(tmp_path / "work"), parallel_size=2, steps_per_rank=2, return_state=True,
        **words,
    )  # fmt: skip
    again = state.result()
    assert again["split"]["skipped"] and again["merge"]["skipped"]
    assert again["train"]["losses"] == outcome["train"]["losses"]
    assert again["test"]["test_model"]["prompts"] == generated["prompts"] or [
        p["text"] for p in again["test"]["test_model"]["prompts"]
    ] == [p["text"] for p in generated["prompts"]]  # seeded greedy: the same text
    run_id = state.state_details.flow_run_id
    names = [r.name for r in asyncio.run(_task_runs_of(run_id))]
    assert not [n for n in names if n.startswith("train")], names
    assert tree(tmp_path / "work") == before


async def _task_runs_of(flow_run_id: Any) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        only = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        return list(await client.read_task_runs(flow_run_filter=only))


@pytest.mark.prefect
def test_train_timeout_stops_the_command(prefect_harness: None, base: Path, tmp_path: Path) -> None:
    from flows.post_training import post_training

    sleeper = f'{shlex.quote(sys.executable)} -c "import time; time.sleep(120)"'
    started = time.monotonic()
    with pytest.raises(TrainCommandError, match="timed out after 1.0 s"):
        post_training(
            str(base),
            str(tmp_path / "work"),
            train_command=sleeper,
            train_retries=0,
            train_timeout_seconds=1.0,
        )
    assert time.monotonic() - started < 60
    assert not (tmp_path / "work" / "merged").exists()


async def _train_runs(flow_name: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    async with get_client() as client:
        runs = await client.read_task_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name]))
        )
        return [r for r in runs if r.name.startswith("train")]


@pytest.mark.prefect
def test_failing_train_command_is_retried_then_reported(
    prefect_harness: None, base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ckptflow.cli import main

    before = {r.id for r in asyncio.run(_train_runs("post_training"))}
    fail = f"{shlex.quote(sys.executable)} -c \"import sys; sys.exit('injected failure')\""
    code = main(
        [
            "pipeline",
            "--model-name",
            str(base),
            "--work-dir",
            str(tmp_path / "work"),
            "--train-command",
            fail,
            "--train-retries",
            "2",
            "--retry-delay",
            "0",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("ckptflow: error: train command exited with code 1"), err
    assert "injected failure" in last
    runs = [r for r in asyncio.run(_train_runs("post_training")) if r.id not in before]
    assert len(runs) == 1
    assert runs[0].state is not None and runs[0].state.is_failed()
    assert runs[0].run_count == 3  # first try + 2 retries
    assert not (tmp_path / "work" / "merged").exists()
    assert json.loads((tmp_path / "work" / "split" / "split_metadata.json").read_text())


def test_cli_split_train_merge_and_one_line_errors(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file

    from ckptflow.cli import main

    s, e, m = (str(tmp_path / n) for n in ("split", "epoch", "merged"))
    assert main(["split", "--model-name", str(base), "--output-dir", s]) == 0
    assert main(["tiny-train", "--split-dir", s, "--output-dir", e, "--parallel-size", "4",
                 "--steps", "0"]) == 0  # fmt: skip
    merge = ["merge", "--checkpoint-dir", e, "--output-dir", m, "--model-name", str(base)]
    capsys.readouterr()
    assert main([*merge, "--parallel-size", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--parallel-size is 2" in err
    assert main([*merge, "--max-shard-size", "200KB"]) == 0
    merged = {}
    for shard in (tmp_path / "merged").glob("model-*.safetensors"):
        merged.update(load_file(shard))
    original = load_file(base / "model.safetensors")
    assert set(merged) == set(original)
    assert all(torch.equal(merged[n], t) for n, t in original.items())
