"""The watch planner on real checkpoints, and prefect.yaml entrypoints that really exist."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import yaml

from ckpt_core.pipeline.convert import ConvertOptions, convert
from ckpt_core.pipeline.watch import find_pending

ROOT = Path(__file__).resolve().parent.parent


def test_find_pending_skips_published_and_non_checkpoints(
    tiny_hf_dir: Path, tmp_path: Path
) -> None:
    runs, out = tmp_path / "runs", tmp_path / "hf"
    shutil.copytree(tiny_hf_dir, runs / "step100")
    shutil.copytree(tiny_hf_dir, runs / "step200")
    (runs / "logs").mkdir()
    (runs / "logs" / "train.log").write_text("loss 1.0")
    convert(str(runs / "step100"), str(out / "step100"), ConvertOptions(dtype="fp32"))
    pending = find_pending(str(runs), str(out))
    assert [(Path(p.src).name, Path(p.dst).name, p.format) for p in pending] == [
        ("step200", "step200", "hf")
    ]


def test_deployment_entrypoints_are_flows() -> None:
    from prefect import Flow

    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    assert spec["deployments"]
    for deployment in spec["deployments"]:
        # A module path (no file, no colon): the worker imports the installed ckptflow.
        path, name = deployment["entrypoint"].rsplit(".", 1)
        module = importlib.import_module(path)
        flow = getattr(module, name)
        assert isinstance(flow, Flow), deployment["name"]
        params = set(flow.parameters.properties)
        assert set(deployment.get("parameters", {})) <= params, deployment["name"]
        # A schedule has no form to ask with: its deployment gives every required parameter.
        # A manual one leaves src/dst to the run form (a shipped default would be this site's).
        if deployment.get("schedules"):
            required = set(flow.parameters.required or [])
            assert required <= set(deployment.get("parameters", {})), deployment["name"]


def test_deployments_store_nothing_of_the_deploying_machine() -> None:
    """Portable: an explicit empty pull (else `prefect deploy` stores its cwd as the working
    directory), no environment placeholder left for a worker to lack, no credentials."""
    text = (ROOT / "deployments" / "prefect.yaml").read_text()
    spec = yaml.safe_load(text)
    assert spec["pull"] == []
    assert "{{" not in text, "a template is stored as is (pull steps) or resolved on the deployer"
    for deployment in spec["deployments"]:
        assert "pull" not in deployment, deployment["name"]
        stored = yaml.safe_dump([deployment.get("parameters"), deployment["work_pool"]])
        for word in ("AWS_", "secret", "password", "token"):
            assert word.lower() not in stored.lower(), (deployment["name"], word)
