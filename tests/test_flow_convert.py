"""The `convert` Prefect flow on the test harness: same bytes as the in-process CLI, report artifact."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from ckptflow.cli import main


def _digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


@pytest.mark.prefect
def test_flow_output_is_byte_identical_to_cli(
    prefect_harness: None, tiny_hf_dir: Path, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client

    args = ["--dtype", "bf16", "--max-shard-size", "150KB"]
    assert main(["convert", str(tiny_hf_dir), str(tmp_path / "cli"), *args]) == 0
    assert main(["convert", str(tiny_hf_dir), str(tmp_path / "flow"), *args, "--prefect"]) == 0
    cli, flow = _digests(tmp_path / "cli"), _digests(tmp_path / "flow")
    assert len([n for n in cli if n.startswith("model-")]) >= 2
    # The manifest names its source and options, not its destination: every byte is equal.
    assert cli == flow

    async def artifacts() -> list[str]:
        async with get_client() as client:
            found = await client.read_artifacts()
            return [a.key for a in found if a.key]

    import asyncio

    from tasks.runs import artifact_key

    keys = asyncio.run(artifacts())
    flow_dst = str(tmp_path / "flow")
    assert artifact_key("convert-report", flow_dst) in keys
    assert artifact_key("convert-summary", flow_dst) in keys
