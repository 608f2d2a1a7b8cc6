"""Small things users hit: `detect --json | head -1` ends quietly, `tiny-train` shows its steps,
and `convert --prefect` prints the file count the report and the manifest agree on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ckpt_core.vlm.split import split
from ckptflow.cli import EXIT_BROKEN_PIPE, main
from tests.fixtures.tiny_vlm import save_tiny_vlm

REPO = Path(__file__).resolve().parents[1]


def test_detect_into_a_closed_pipe_ends_quietly(tiny_hf_dir: Path) -> None:
    """The reader is gone before ckptflow writes (as `| head -1` is after its line)."""
    args = [sys.executable, "-m", "ckptflow", "detect", str(tiny_hf_dir), "--json"]
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(120) == EXIT_BROKEN_PIPE, err
    assert "BrokenPipe" not in err and "Traceback" not in err and "Exception" not in err, err


def test_detect_piped_to_head(tiny_hf_dir: Path) -> None:
    command = f"{sys.executable} -m ckptflow detect {tiny_hf_dir} --json | head -1"
    done = subprocess.run(command, shell=True, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "{\n" and done.stderr == "", done


def test_tiny_train_shows_a_line_per_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_tiny_vlm(tmp_path / "base")
    split(str(tmp_path / "base"), str(tmp_path / "split"))
    capsys.readouterr()
    args = ["--split-dir", str(tmp_path / "split"), "--output-dir", str(tmp_path / "epoch")]
    assert main(["tiny-train", *args, "--steps", "2"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    steps = [line for line in captured.err.splitlines() if line.startswith("tiny-train: step")]
    assert steps == [
        f"tiny-train: step {k}/2: loss {loss:.4f}" for k, loss in enumerate(result["losses"], 1)
    ]


@pytest.mark.prefect
def test_prefect_file_count_is_the_reports_and_the_manifests(
    prefect_harness: None, tiny_hf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.convert

    # What `ckptflow convert --prefect` prints (json.dumps of the flow's outcome), taken from
    # the flow itself: capturing stdout around a first flow run breaks Prefect's log handlers.
    outcomes: list[dict[str, Any]] = []
    real = flows.convert.convert_flow_with

    def recording(workers: int) -> Any:
        flow = real(workers)
        return lambda *args, **kwargs: outcomes.append(flow(*args, **kwargs)) or outcomes[-1]

    monkeypatch.setattr(flows.convert, "convert_flow_with", recording)
    dst = tmp_path / "out"
    args = ["--dtype", "fp32", "--max-shard-size", "40KB", "--prefect"]
    assert main(["convert", str(tiny_hf_dir), str(dst), *args]) == 0
    manifest = json.loads((dst / "manifest.json").read_text())
    on_disk = {p.name for p in dst.iterdir()} - {"manifest.json", "_SUCCESS"}
    assert outcomes[0]["files"] == len(manifest["files"]) == len(on_disk) > 3
    assert outcomes[0]["tensors"] == manifest["report"]["tensors"]
