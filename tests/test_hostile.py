"""Hostile and broken input through `ckptflow convert`: each is refused with one line naming the
file, exit code 2, nothing published (no destination, no staging), the source untouched, and a
code-execution payload never runs (its marker file never appears)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptflow.cli import main
from tests.fixtures.fsdp_cache import fsdp_fixtures

__all__ = ["fsdp_fixtures"]  # the session fixture, imported for pytest


class Payload:
    """Unpickling this runs a shell command that creates the marker: the proof code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


def digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def safetensors_bytes(header: dict[str, Any], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def refuse(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], *expected: str) -> str:
    before = digest(src) if src.is_dir() else {"": hashlib.sha256(src.read_bytes()).hexdigest()}
    dst = tmp_path / "dst"
    code = main(["convert", str(src), str(dst)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("ckptflow: error:"), err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], lines[0]
    assert not dst.exists() and not list(tmp_path.glob(".dst*"))
    after = digest(src) if src.is_dir() else {"": hashlib.sha256(src.read_bytes()).hexdigest()}
    assert after == before, "the source was modified"
    return lines[0]


# -- safetensors and index files --------------------------------------------------------------


def _hf_case(tiny_hf_dir: Path, src: Path, case: str) -> str:
    """Break a copy of a HF dir; returns the text the error must contain."""
    shutil.copytree(tiny_hf_dir, src)
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    four = torch.zeros(4).numpy().tobytes()
    edits: dict[str, Callable[[], str]] = {
        "truncated": lambda: (weights.write_bytes(data[: len(data) * 2 // 3]), "truncated")[1],
        "header_past_end": lambda: (
            weights.write_bytes(struct.pack("<Q", len(data)) + data[8:]),
            "runs past the end",
        )[1],
        "header_over_100MB": lambda: (
            weights.write_bytes(struct.pack("<Q", 100_000_001) + b"{}" + b" " * 100),
            "exceeds the 100 MB limit",
        )[1],
        "overlapping_offsets": lambda: (
            weights.write_bytes(
                safetensors_bytes(
                    {
                        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
                    },
                    four * 2,
                )
            ),
            "overlaps",
        )[1],
        "out_of_range_offsets": lambda: (
            weights.write_bytes(
                safetensors_bytes(
                    {
                        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                        "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]},
                    },
                    four,
                )
            ),
            "truncated",
        )[1],
        "index_parent_path": lambda: _index(src, "../outside.safetensors"),
        "index_absolute_path": lambda: _index(src, "/etc/passwd"),
    }
    return edits[case]()


def _index(src: Path, target: str) -> str:
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"model.norm.weight": target}})
    )
    return "outside the checkpoint directory"


HF_CASES = [
    "truncated",
    "header_past_end",
    "header_over_100MB",
    "overlapping_offsets",
    "out_of_range_offsets",
    "index_parent_path",
    "index_absolute_path",
]


@pytest.mark.parametrize("case", HF_CASES)
def test_broken_safetensors_and_index(
    tiny_hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    src = tmp_path / "src"
    expected = _hf_case(tiny_hf_dir, src, case)
    named = "model.safetensors.index.json" if case.startswith("index") else "model.safetensors"
    refuse(src, tmp_path, capsys, expected, named)


def test_directory_that_is_no_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "README.md").write_text("hello")
    (src / "notes.json").write_text("{}")
    refuse(src, tmp_path, capsys, "not a checkpoint ckptflow can read", str(src))


# -- pickled files: payloads never run --------------------------------------------------------


def test_payload_in_place_of_pytorch_model_bin(
    tiny_model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, marker = tmp_path / "src", tmp_path / "PWNED"
    src.mkdir()
    tiny_model.config.save_pretrained(src)
    state = dict(tiny_model.state_dict())
    state["model.norm.weight"] = Payload(marker)
    torch.save(state, src / "pytorch_model.bin")
    refuse(src, tmp_path, capsys, "pytorch_model.bin")
    assert not marker.exists()


def test_payload_as_a_raw_pth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, marker = tmp_path / "src", tmp_path / "PWNED"
    src.mkdir()
    torch.save({"w": torch.ones(2), "evil": Payload(marker)}, src / "weights.pth")
    refuse(src, tmp_path, capsys, "weights.pth")
    assert not marker.exists()


def _fsdp_copy(fsdp_fixtures: Path, tmp_path: Path, layout: str) -> Path:
    return Path(shutil.copytree(fsdp_fixtures / layout, tmp_path / "src"))


@pytest.mark.parametrize("rank", [0, 1])
def test_payload_in_place_of_an_fsdp_rank_file(
    fsdp_fixtures: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], rank: int
) -> None:
    src, marker = _fsdp_copy(fsdp_fixtures, tmp_path, "verl"), tmp_path / "PWNED"
    victim = f"model_world_size_2_rank_{rank}.pt"
    torch.save({"model.norm.weight": Payload(marker)}, src / victim)
    refuse(src, tmp_path, capsys, victim)
    assert not marker.exists()


def test_payload_in_place_of_dcp_metadata(
    fsdp_fixtures: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, marker = _fsdp_copy(fsdp_fixtures, tmp_path, "dcp"), tmp_path / "PWNED"
    import pickle

    (src / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    refuse(src, tmp_path, capsys, ".metadata")
    assert not marker.exists()


def test_payload_in_place_of_a_deepspeed_partition(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.fixtures.deepspeed_cache import deepspeed_fixtures

    root = deepspeed_fixtures() / "stage3" / "ckpt"
    src, marker = Path(shutil.copytree(root, tmp_path / "src")), tmp_path / "PWNED"
    tag = src / (src / "latest").read_text().strip()
    victim = "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"zero_stage": Payload(marker)}}, tag / victim)
    refuse(src, tmp_path, capsys, victim)
    assert not marker.exists()


# -- rank sets --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ("missing", "model_world_size_2_rank_1.pt"),
        ("stale_extra", "model_world_size_2_rank_2.pt"),
        ("other_world_size", "several world sizes"),
    ],
)
def test_fsdp_rank_sets(
    fsdp_fixtures: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    edit: str,
    expected: str,
) -> None:
    src = _fsdp_copy(fsdp_fixtures, tmp_path, "verl")
    rank1 = src / "model_world_size_2_rank_1.pt"
    if edit == "missing":
        rank1.unlink()
    elif edit == "stale_extra":
        shutil.copy(rank1, src / "model_world_size_2_rank_2.pt")
    else:
        shutil.copy(rank1, src / "model_world_size_4_rank_3.pt")
    refuse(src, tmp_path, capsys, expected)


def test_deepspeed_stale_extra_partition(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.fixtures.deepspeed_cache import deepspeed_fixtures

    src = Path(shutil.copytree(deepspeed_fixtures() / "stage2" / "ckpt", tmp_path / "src"))
    tag = src / (src / "latest").read_text().strip()
    stale = "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt"
    shutil.copy(tag / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", tag / stale)
    refuse(src, tmp_path, capsys, stale)


def test_the_payload_really_runs_when_unpickled(tmp_path: Path) -> None:
    """Sanity check of the tests above: plain unpickling does create the marker."""
    import pickle

    marker = tmp_path / "PWNED"
    pickle.loads(pickle.dumps(Payload(marker)))  # noqa: S301 (the point of the test)
    assert marker.exists()
