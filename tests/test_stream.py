"""Chunked reads agree with whole reads, for every HF reader and chunk size."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckpt_core.formats.protocol import TensorInfo
from ckpt_core.formats.registry import open_reader
from ckpt_core.pipeline.stream import (
    ChunkBuffers,
    RangeReader,
    chunk_spans,
    prefetch,
    source_chunks,
)

TENSORS = {
    "w": torch.randn(37, 11),
    "h": torch.randn(5, 7).half(),
    "ids": torch.arange(23),
    "scalar": torch.tensor(2.5),
}


@pytest.fixture(params=["safetensors", "bin"])
def reader_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    if request.param == "safetensors":
        save_file(TENSORS, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    else:
        base = torch.randn(11, 37)
        torch.save(
            {**TENSORS, "w": base.t().contiguous(), "view": base[3:7]},
            tmp_path / "pytorch_model.bin",
        )
    return tmp_path


@pytest.mark.parametrize("chunk_bytes", [4, 24, 100, 10**6])
def test_chunks_rebuild_every_tensor(reader_dir: Path, chunk_bytes: int) -> None:
    reader = open_reader(str(reader_dir))
    assert isinstance(reader, RangeReader)
    for name, info in reader.index().items():
        whole = reader.read(name)
        for out_dtype in (
            info.dtype,
            torch.bfloat16 if info.dtype.is_floating_point else info.dtype,
        ):
            parts = list(source_chunks(reader, info, out_dtype, chunk_bytes))
            assert torch.equal(torch.cat(parts), whole.reshape(-1).to(out_dtype)), name


@pytest.mark.parametrize("chunk_bytes", [4, 24, 10**6])
def test_chunks_in_reused_buffers_through_prefetch(reader_dir: Path, chunk_bytes: int) -> None:
    """The buffers are reused in turn while the prefetch thread runs ahead: each chunk must
    still hold its own values when the consumer gets to it (slow consumer, tiny chunks)."""
    reader = open_reader(str(reader_dir))
    buffers = ChunkBuffers()
    for out_dtype in (None, torch.bfloat16):
        infos = list(reader.index().values())

        def dtype_of(info: TensorInfo, out: torch.dtype | None = out_dtype) -> torch.dtype:
            return out if out and info.dtype.is_floating_point else info.dtype

        produced = (
            (info.name, chunk)
            for info in infos
            for chunk in source_chunks(reader, info, dtype_of(info), chunk_bytes, buffers)
        )
        got: dict[str, list[torch.Tensor]] = {}
        for name, chunk in prefetch(produced):
            time.sleep(0.001)  # let the producer fill every slot it may
            got.setdefault(name, []).append(chunk.clone())
        for info in infos:
            expected = reader.read(info.name).reshape(-1).to(dtype_of(info))
            assert torch.equal(torch.cat(got[info.name]), expected), info.name


def test_chunk_spans_cover_exactly() -> None:
    assert chunk_spans(10, torch.float32, 12) == [(0, 3), (3, 3), (6, 3), (9, 1)]
    assert chunk_spans(0, torch.float32, 12) == [(0, 0)]


def test_prefetch_keeps_order_and_reraises() -> None:
    assert list(prefetch(iter(range(100)), depth=2)) == list(range(100))

    def broken() -> object:
        yield 1
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        list(prefetch(broken()))  # type: ignore[arg-type]


def test_reader_without_ranges_is_sliced() -> None:
    class Whole:
        def read(self, name: str) -> torch.Tensor:
            return torch.arange(10, dtype=torch.float32)

    info = TensorInfo("x", torch.float32, (10,))
    parts = list(source_chunks(Whole(), info, torch.float32, 16))  # type: ignore[arg-type]
    assert [len(p) for p in parts] == [4, 4, 2]
