"""DCP reader against real FSDP2 + dcp.save checkpoints (and the reference dcp_to_torch_save)."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed import checkpoint as dcp

from ckpt_core.errors import FormatError, UnsafeFileError
from ckpt_core.formats.registry import detect, open_reader
from ckpt_core.pipeline.convert import ConvertOptions, convert
from tests.fixtures.fsdp_cache import assert_loads_as_truth, fsdp_fixtures, load_truth
from tests.fixtures.tiny import build_tiny_qwen2

__all__ = ["fsdp_fixtures"]  # the session fixture, imported for pytest


def test_detects_dcp(fsdp_fixtures: Path) -> None:
    assert detect(str(fsdp_fixtures / "dcp")).name == "dcp"
    for other in ("verl", "bagel"):
        assert detect(str(fsdp_fixtures / other)).name != "dcp"


def test_every_tensor_bit_identical_to_truth(fsdp_fixtures: Path) -> None:
    truth = load_truth(fsdp_fixtures)
    reader = open_reader(str(fsdp_fixtures / "dcp"))
    index = reader.index()
    # The model's own order, with the `model.` top key stripped.
    assert list(index) == list(build_tiny_qwen2(vocab_size=321).state_dict())
    # The uneven FSDP2 shards (vocab 321 -> 161 + 160 rows) are the interesting ones.
    assert index["model.embed_tokens.weight"].shape == (321, 64)
    for name, expected in truth.items():
        got = reader.read(name)
        assert got.dtype == torch.float32 and got.is_contiguous()
        assert torch.equal(got, expected), name
    facts = reader.facts()
    assert facts.format == "dcp"
    assert facts.files == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert any("'model'" in note and "stripped" in note for note in facts.notes)


def test_equals_reference_dcp_to_torch_save(fsdp_fixtures: Path, tmp_path: Path) -> None:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(fsdp_fixtures / "dcp"), str(tmp_path / "ref.pt"))
    ref = torch.load(tmp_path / "ref.pt", weights_only=True)
    # The reference keeps the nesting ({"model": {...}}); ckptflow strips the single top key.
    assert list(ref) == ["model"]
    reader = open_reader(str(fsdp_fixtures / "dcp"))
    assert set(reader.index()) == set(ref["model"])
    for name, expected in ref["model"].items():
        assert torch.equal(reader.read(name), expected), name


def _rewrite_metadata(src: Path, dst: Path, edit: Any) -> None:
    """Copy a DCP dir and change its metadata with the real torch classes (test-only trust)."""
    shutil.copytree(src, dst)
    meta = dcp.FileSystemReader(str(dst)).read_metadata()
    edit(meta)
    with open(dst / ".metadata", "wb") as handle:
        pickle.dump(meta, handle)


def test_missing_chunk_is_an_error_naming_the_tensor(fsdp_fixtures: Path, tmp_path: Path) -> None:
    name = "model.model.embed_tokens.weight"
    _rewrite_metadata(
        fsdp_fixtures / "dcp",
        tmp_path / "dcp",
        lambda meta: meta.state_dict_metadata[name].chunks.pop(),
    )
    with pytest.raises(FormatError, match=r"embed_tokens\.weight.*cover 10304 of 20544"):
        open_reader(str(tmp_path / "dcp"))


def test_overlapping_chunks_are_an_error(fsdp_fixtures: Path, tmp_path: Path) -> None:
    name = "model.lm_head.weight"

    def overlap(meta: Any) -> None:
        chunks = meta.state_dict_metadata[name].chunks
        chunks[1] = type(chunks[1])(offsets=torch.Size([100, 0]), sizes=chunks[1].sizes)

    _rewrite_metadata(fsdp_fixtures / "dcp", tmp_path / "dcp", overlap)
    with pytest.raises(FormatError, match=r"lm_head\.weight"):
        open_reader(str(tmp_path / "dcp"))


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_metadata_is_refused(fsdp_fixtures: Path, tmp_path: Path) -> None:
    shutil.copytree(fsdp_fixtures / "dcp", tmp_path / "dcp")
    marker = tmp_path / "PWNED"
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(UnsafeFileError, match="system"):
        open_reader(str(tmp_path / "dcp"))
    assert not marker.exists()


def test_single_process_save_with_bytes_and_extra_top_keys(tmp_path: Path) -> None:
    # dcp.save without a process group: a plain single-rank checkpoint.
    weight = torch.randn(5, 3, dtype=torch.bfloat16)
    state = {
        "model": {"layer.weight": weight, "layer.step": torch.tensor(7), "extra": {"note": "hi"}},
        "optimizer": {"lr": 0.1},
    }
    dcp.save(state, checkpoint_id=str(tmp_path / "ck"))
    reader = open_reader(str(tmp_path / "ck"))
    assert set(reader.index()) == {"layer.weight", "layer.step"}
    assert torch.equal(reader.read("layer.weight"), weight)
    assert reader.index()["layer.weight"].dtype == torch.bfloat16
    assert reader.read("layer.step").item() == 7
    notes = " ".join(reader.facts().notes)
    assert "'optimizer'" in notes and "non-tensor" in notes


def test_without_model_key_names_are_kept(tmp_path: Path) -> None:
    dcp.save({"a": torch.ones(2), "b": {"c": torch.zeros(3)}}, checkpoint_id=str(tmp_path / "ck"))
    reader = open_reader(str(tmp_path / "ck"))
    assert set(reader.index()) == {"a", "b.c"}


def test_convert_end_to_end_loads_in_transformers(fsdp_fixtures: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    convert(
        str(fsdp_fixtures / "dcp"),
        str(out),
        ConvertOptions(dtype="fp32", base=str(fsdp_fixtures / "base")),
    )
    assert_loads_as_truth(out, load_truth(fsdp_fixtures))


def test_reads_from_an_fsspec_filesystem(fsdp_fixtures: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    for path in (fsdp_fixtures / "dcp").iterdir():
        fs.pipe(f"/dcp-test/{path.name}", path.read_bytes())
    try:
        assert detect("memory://dcp-test").name == "dcp"
        reader = open_reader("memory://dcp-test")
        for name, expected in load_truth(fsdp_fixtures).items():
            assert torch.equal(reader.read(name), expected), name
    finally:
        fs.rm("/dcp-test", recursive=True)


def _spans_agree_with_whole_reads(reader: Any, step: int) -> None:
    for name, info in reader.index().items():
        whole = reader.read(name).reshape(-1)
        parts = [
            reader.read_range(name, start, min(step, info.numel - start))
            for start in range(0, info.numel, step)
        ]
        assert torch.equal(torch.cat(parts), whole), name
        out = torch.empty(min(step, info.numel), dtype=info.dtype)
        assert reader.read_range(name, 0, out.numel(), out).data_ptr() == out.data_ptr()
        assert torch.equal(out, whole[: out.numel()]), name


@pytest.mark.parametrize("step", [1, 7, 100, 10**6])
def test_ranges_of_fsdp2_row_blocks(fsdp_fixtures: Path, step: int) -> None:
    """FSDP2 writes Shard(0) row blocks (161 + 160 rows for the embedding): read by range."""
    reader = open_reader(str(fsdp_fixtures / "dcp"))
    _spans_agree_with_whole_reads(reader, step)


@pytest.mark.parametrize("step", [1, 5, 1000])
def test_ranges_of_a_chunk_stored_transposed(tmp_path: Path, step: int) -> None:
    """dcp.save keeps a transposed tensor's strides: its chunk is not a run of the flat
    tensor, so ranges come from the tensor assembled once."""
    dcp.save({"t": torch.randn(4, 6).t(), "plain": torch.randn(3, 5)}, checkpoint_id=str(tmp_path))
    _spans_agree_with_whole_reads(open_reader(str(tmp_path)), step)
