"""The `convert` flow on prefect-dask's DaskTaskRunner: worker processes open the source and
the work directory by URL and produce the same bytes as the in-process conversion."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from ckptflow.cli import main


def _digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


@pytest.mark.prefect
def test_dask_worker_processes_write_the_same_bytes(
    prefect_harness: None, tiny_hf_dir: Path, tmp_path: Path
) -> None:
    from prefect_dask import DaskTaskRunner

    from flows.convert import convert_flow

    runner = DaskTaskRunner(
        cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True}
    )
    outcome = convert_flow.with_options(task_runner=runner)(
        str(tiny_hf_dir), str(tmp_path / "dask"), dtype="bf16", max_shard_size="150KB"
    )
    assert outcome["published"] is True, outcome
    cli_args = ["convert", str(tiny_hf_dir), str(tmp_path / "cli"), "--max-shard-size", "150KB"]
    assert main(cli_args) == 0
    dask, cli = _digests(tmp_path / "dask"), _digests(tmp_path / "cli")
    assert len([n for n in dask if n.startswith("model-")]) >= 2
    assert dask == cli
