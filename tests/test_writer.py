"""The streaming writer and header parser, checked against safetensors' own reader and writer."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ckpt_core.errors import CkptError, FormatError
from ckpt_core.formats.safetensors_header import read_header, read_tensor
from ckpt_core.io.storage import Location
from ckpt_core.pipeline.writer import write_safetensors

TENSORS = {
    "w": torch.randn(7, 5),
    "b16": torch.randn(3, 4).to(torch.bfloat16),
    "h": torch.randn(9).half(),
    "ids": torch.arange(11, dtype=torch.int64),
    "mask": torch.tensor([True, False, True]),
    "scalar": torch.tensor(3.5),
    "empty": torch.empty(0, 4),
}


def test_streamed_file_reads_back_with_safe_open(tmp_path: Path) -> None:
    layout = [(n, t.dtype, tuple(t.shape)) for n, t in TENSORS.items()]
    # Chunks of at most 3 elements: every tensor arrives in pieces, as big ones do.
    record = write_safetensors(
        Location(str(tmp_path)),
        "x.safetensors",
        layout,
        lambda name: iter(TENSORS[name].reshape(-1).split(3)),
    )
    assert record.size_bytes == (tmp_path / "x.safetensors").stat().st_size
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(TENSORS)
        for name, tensor in TENSORS.items():
            assert torch.equal(f.get_tensor(name), tensor), name
    (header_len,) = struct.unpack("<Q", (tmp_path / "x.safetensors").read_bytes()[:8])
    assert header_len % 8 == 0


def test_header_reader_agrees_with_save_file(tmp_path: Path) -> None:
    save_file(TENSORS, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    root = Location(str(tmp_path))
    header = read_header(root, "ref.safetensors")
    for name, tensor in TENSORS.items():
        assert torch.equal(read_tensor(root, "ref.safetensors", header.entries[name]), tensor)


def _write_raw(
    path: Path, header: dict[str, object], data: bytes, declared: int | None = None
) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(
        struct.pack("<Q", declared if declared is not None else len(text)) + text + data
    )


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("truncated", "truncated"),
        ("header_past_end", "runs past the end"),
        ("huge_header", "100 MB"),
        ("overlap", "overlaps"),
        ("out_of_range", "data ends at byte"),
        ("not_json", "not valid JSON"),
    ],
)
def test_broken_files_are_refused(tmp_path: Path, case: str, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    if case == "truncated":
        _write_raw(path, {"a": entry}, b"\0" * 4)
    elif case == "header_past_end":
        _write_raw(path, {"a": entry}, b"\0" * 8, declared=10_000)
    elif case == "huge_header":
        _write_raw(path, {"a": entry}, b"\0" * 8, declared=200_000_000)
    elif case == "overlap":
        _write_raw(path, {"a": entry, "b": {**entry, "data_offsets": [4, 12]}}, b"\0" * 12)
    elif case == "out_of_range":
        _write_raw(path, {"a": {**entry, "data_offsets": [0, 8]}}, b"\0" * 16)
    elif case == "not_json":
        path.write_bytes(struct.pack("<Q", 5) + b"{nope" + b"\0" * 8)
    with pytest.raises(FormatError, match=message) as info:
        read_header(Location(str(tmp_path)), "bad.safetensors")
    assert "bad.safetensors" in str(info.value)


def test_writer_refuses_too_few_or_wrong_elements(tmp_path: Path) -> None:
    layout = [("w", torch.float32, (4,))]
    with pytest.raises(CkptError, match="fewer elements"):
        write_safetensors(
            Location(str(tmp_path)), "a.safetensors", layout, lambda _: iter([torch.ones(3)])
        )
    with pytest.raises(CkptError, match="beyond the planned"):
        write_safetensors(
            Location(str(tmp_path)), "b.safetensors", layout, lambda _: iter([torch.ones(4).half()])
        )
