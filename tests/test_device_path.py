"""The device path (`--device cuda|auto`, ckpt_core/pipeline/device.py) against the host path.

Where there is no GPU, the device code runs with its placement on the CPU (the same code:
staging rings, windows, cast, overflow check, NaN rule, copies back), and its output must be
byte-identical to the default path's: chunk by chunk on edge values, and whole conversions of a
TP-ranks merge, a DCP checkpoint and a DeepSpeed ZeRO-3 checkpoint. The tests with "cuda" in
their id need a GPU and are skipped without one (bench/gpu_check.sh runs them on one).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from ckpt_core.dtypes import TargetDtype
from ckpt_core.errors import CastOverflowError, UsageError
from ckpt_core.formats.protocol import OpenOptions, Reader, TensorInfo
from ckpt_core.formats.registry import open_reader
from ckpt_core.pipeline import device as dev
from ckpt_core.pipeline.conversion import ConvertOptions, Device
from ckpt_core.pipeline.convert import convert
from ckpt_core.pipeline.stream import ChunkBuffers, source_chunks
from tests.fixtures.fsdp_cache import FIXTURES_ROOT as FIXTURES
from tests.fixtures.fsdp_cache import fsdp_fixtures
from tests.helpers.deepspeed_truth import ckpt, ds_root

__all__ = ["ds_root", "fsdp_fixtures"]  # session fixtures, imported for pytest

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(
    not CUDA, reason="no CUDA device (torch.cuda.is_available() is False): run bench/gpu_check.sh"
)
needs_no_cuda = pytest.mark.skipif(CUDA, reason="checks the refusal where CUDA is absent")
# Where the device code runs: on the host here (same code), on the GPU when there is one.
PLACES = [
    pytest.param("cpu", id="placed-on-cpu"),
    pytest.param("cuda", id="cuda", marks=needs_cuda),
]


def _placement(where: str, window_bytes: int = 2**62) -> dev.Placement:
    return dev.Placement(torch.device(where), window_bytes)


def _joined(chunks: Iterator[torch.Tensor], sizes: list[int] | None = None) -> bytes:
    """The chunks' bytes, copied as they come (the buffers are reused); their element counts
    appended to `sizes`."""
    parts = []
    for chunk in chunks:
        parts.append(bytes(chunk.contiguous().view(torch.uint8).numpy()))
        if sizes is not None:
            sizes.append(chunk.numel())
    return b"".join(parts)


def _edge_values() -> torch.Tensor:
    """fp32 values where casts differ: NaNs of both signs and a payload, infinities, finite
    values over fp16's and bf16's range, subnormals, ties, -0."""
    values = torch.randn(5000, generator=torch.Generator().manual_seed(0)) * 3
    special = torch.tensor(
        [float("nan"), -float("nan"), float("inf"), -float("inf"), 7e4, -7e4, 3.4e38, -3.4e38]
        + [1e-40, -1e-40, 1e-45, 6e-8, 1.00390625, 1.01171875, -0.0, 65504.0, 65520.0]
    )
    values[100 : 100 + len(special)] = special
    values.view(torch.int32)[200] = 0x7F800001  # a signalling NaN with a payload
    values.view(torch.int32)[201] = -0x7FFFFF  # 0xff800001: a negative NaN with a payload
    return values


def _reader_of(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Reader:
    tmp_path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return open_reader(str(tmp_path))


class _WholeOnly:
    """A reader that reads whole tensors only (as tp-ranks and fsdp-ranks do)."""

    def __init__(self, inner: Reader) -> None:
        self.root = inner.root
        self._inner = inner

    def index(self) -> Any:
        return self._inner.index()

    def read(self, name: str) -> torch.Tensor:
        return self._inner.read(name)

    def facts(self) -> Any:
        return self._inner.facts()

    def asset_dirs(self) -> Any:
        return self._inner.asset_dirs()


# -- chunk by chunk ----------------------------------------------------------------------------


@pytest.mark.parametrize("where", PLACES)
@pytest.mark.parametrize("whole", [False, True], ids=["ranged", "whole-reads"])
def test_edge_values_cast_to_the_host_paths_bytes(where: str, whole: bool, tmp_path: Path) -> None:
    fp32 = _edge_values()
    no_nan = torch.nan_to_num(fp32, nan=1.5)
    tensors = {
        "fp32": fp32,
        "fp32_no_nan": no_nan,  # cast on the device, not through the NaN rule
        "bf16": no_nan.to(torch.bfloat16),
        "fp16": no_nan.clamp(-6e4, 6e4).to(torch.float16),
        "ints": torch.arange(-3000, 3000, dtype=torch.int64),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    reader: Any = _reader_of(tmp_path, tensors)
    if whole:
        reader = _WholeOnly(reader)
    index = reader.index()
    # Small chunks and windows: a tensor crosses several of each.
    stream = dev.DeviceStream(_placement(where, window_bytes=6 * 1024), chunk_bytes=1024)
    for name in tensors:
        for out in (torch.float32, torch.bfloat16, torch.float16):
            if not index[name].dtype.is_floating_point and out != torch.float32:
                continue
            if not index[name].dtype.is_floating_point:
                out = index[name].dtype
            spans: tuple[list[int], list[int]] = ([], [])
            host = _joined(source_chunks(reader, index[name], out, 1024, ChunkBuffers()), spans[0])
            placed = _joined(stream.chunks(reader, index[name], out), spans[1])
            assert placed == host, (name, out)
            assert spans[1] == spans[0], (name, out)  # the same chunks, element for element
            if name != "empty":
                assert len(host) == index[name].numel * out.itemsize


@pytest.mark.parametrize("where", PLACES)
def test_overflow_is_refused_on_the_device_too(where: str, tmp_path: Path) -> None:
    big = torch.ones(4096)
    big[3000] = 1e5  # finite, over fp16's max
    reader = _reader_of(tmp_path, {"w": big})
    info = reader.index()["w"]
    stream = dev.DeviceStream(_placement(where, window_bytes=4 * 1024), chunk_bytes=1024)
    with pytest.raises(CastOverflowError, match="^w: 1 finite value"):
        _joined(stream.chunks(reader, info, torch.float16, check_overflow=True))
    # Allowed: written as inf, like the host path.
    host = _joined(source_chunks(reader, info, torch.float16))
    assert _joined(stream.chunks(reader, info, torch.float16)) == host


def test_windows_bound_what_is_placed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor larger than the window goes through in windows: each placed tensor is at most
    the window (stored + cast bytes), never the whole tensor."""
    reader = _reader_of(tmp_path, {"w": torch.randn(64, 1000)})
    info = reader.index()["w"]
    sizes: list[int] = []
    stream = dev.DeviceStream(_placement("cpu", window_bytes=48 * 1024), chunk_bytes=4096)
    original = stream._place

    def recording(*args: Any) -> torch.Tensor:
        placed = original(*args)
        sizes.append(placed.numel())
        return placed

    monkeypatch.setattr(stream, "_place", recording)
    data = _joined(stream.chunks(reader, info, torch.bfloat16))
    assert data == _joined(source_chunks(reader, info, torch.bfloat16))
    assert sum(sizes) == info.numel and len(sizes) > 1
    assert max(sizes) * (4 + 2) <= 48 * 1024


def test_read_whole_collects_reused_chunks(tmp_path: Path) -> None:
    value = torch.randn(37, 53)
    reader = _reader_of(tmp_path, {"w": value})
    info = reader.index()["w"]
    stream = dev.DeviceStream(_placement("cpu"), chunk_bytes=256)
    got = dev.read_whole(stream.chunks(reader, info, torch.bfloat16), info, torch.bfloat16)
    assert torch.equal(got.view(torch.int16), value.to(torch.bfloat16).view(torch.int16))


# -- choosing the device -----------------------------------------------------------------------


def test_placement_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dev.PLACEMENT_ENV, raising=False)
    assert dev.placement_for("cpu") is None  # the default path, untouched
    auto = dev.placement_for("auto")
    assert (auto is not None and auto.is_cuda) if CUDA else auto is None
    with pytest.raises(UsageError, match="--device gpu: choose cpu, cuda or auto"):
        dev.placement_for("gpu")
    monkeypatch.setenv(dev.PLACEMENT_ENV, "cpu")
    placed = dev.placement_for("cpu")
    assert placed is not None and placed.device.type == "cpu"


@needs_no_cuda
def test_cuda_without_cuda_is_one_line_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ckptflow.cli import main

    src = tmp_path / "src"
    _reader_of(src, {"w": torch.ones(4)})
    with pytest.raises(UsageError, match="^--device cuda: CUDA is not available"):
        dev.placement_for("cuda")
    dst = tmp_path / "out"
    assert main(["convert", str(src), str(dst), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("ckptflow: error: --device cuda: CUDA is not available") and "\n" not in err
    )
    assert "--device cpu or auto" in err
    assert not dst.exists()
    args = ["merge", "--checkpoint-dir", str(src), "--output-dir", str(dst)]
    assert main([*args, "--model-name", str(src), "--device", "cuda"]) == 2
    assert "ckptflow: error: --device cuda: CUDA" in capsys.readouterr().err
    assert not dst.exists()


def test_host_buffer_pins_only_where_it_can() -> None:
    buffer = dev.host_buffer(1024, pin=True)
    assert buffer.numel() == 1024 and buffer.is_pinned() == CUDA
    assert not dev.host_buffer(1024, pin=False).is_pinned()


# -- whole conversions: byte-identical outputs -------------------------------------------------


def _digests(out: Path) -> dict[str, str]:
    """Every file's sha256 but the manifest's own (its list of files is compared instead)."""
    digests = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.iterdir())
        if p.is_file() and p.name not in ("manifest.json", "_SUCCESS")
    }
    import json

    digests["manifest files"] = json.dumps(json.loads((out / "manifest.json").read_text())["files"])
    return digests


class _Seen:
    """Names that went through the device path (the real DeviceStream.chunks, observed)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.names: list[str] = []
        original = dev.DeviceStream.chunks

        def chunks(
            stream: dev.DeviceStream, reader: Reader, info: TensorInfo, *a: Any, **k: Any
        ) -> Any:
            self.names.append(info.name)
            return original(stream, reader, info, *a, **k)

        monkeypatch.setattr(dev.DeviceStream, "chunks", chunks)


def _on_device(where: str, monkeypatch: pytest.MonkeyPatch) -> Device:
    """The `--device` value that puts the device code on `where`."""
    if where == "cpu":
        monkeypatch.setenv(dev.PLACEMENT_ENV, "cpu")
        return "cpu"
    return "cuda"


@pytest.fixture(scope="module")
def tp_epoch(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A tiny Qwen2.5-VL's base dir and a 2-rank tensor-parallel EPOCH_DIR after one step."""
    from ckpt_core.vlm.split import split
    from ckpt_core.vlm.tiny_trainer import train
    from tests.fixtures.tiny_vlm import save_tiny_vlm

    root = tmp_path_factory.mktemp("tp")
    save_tiny_vlm(root / "base")
    split(str(root / "base"), str(root / "split"))
    train(str(root / "split"), str(root / "epoch"), 2, steps=1)
    return str(root / "epoch"), str(root / "base")


@pytest.mark.parametrize("where", PLACES)
def test_tp_ranks_merge_is_byte_identical(
    where: str, tp_epoch: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckpt_core.vlm.merge import merge

    epoch, base = tp_epoch
    dtypes: tuple[TargetDtype, ...] = ("keep", "bf16")
    for dtype in dtypes:
        merge(epoch, str(tmp_path / f"host-{dtype}"), base, dtype=dtype, max_shard_bytes=300_000)
    seen = _Seen(monkeypatch)
    flag = _on_device(where, monkeypatch)
    for dtype in dtypes:
        out = tmp_path / f"device-{dtype}"
        merge(epoch, str(out), base, dtype=dtype, max_shard_bytes=300_000, device=flag)
        assert _digests(out) == _digests(tmp_path / f"host-{dtype}")
        assert len([p for p in out.iterdir() if p.suffix == ".safetensors"]) > 1
    assert len(set(seen.names)) == len(open_reader(epoch, OpenOptions(base=base)).index())


@pytest.mark.parametrize("where", PLACES)
def test_tp_ranks_merge_to_bin_holds_the_same_tensors(
    where: str, tp_epoch: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`merge --format bin` (one torch.save of the whole state dict) through the device."""
    from ckpt_core.vlm.merge import merge

    epoch, base = tp_epoch
    merge(epoch, str(tmp_path / "host"), base, dtype="bf16", output_format="bin")
    seen = _Seen(monkeypatch)
    flag = _on_device(where, monkeypatch)
    merge(epoch, str(tmp_path / "device"), base, dtype="bf16", output_format="bin", device=flag)
    host = torch.load(tmp_path / "host" / "pytorch_model.bin", weights_only=True)
    placed = torch.load(tmp_path / "device" / "pytorch_model.bin", weights_only=True)
    assert list(placed) == list(host) and seen.names
    for name, value in host.items():
        assert placed[name].dtype == value.dtype and placed[name].shape == value.shape, name
        assert bytes(placed[name].view(torch.uint8).numpy()) == bytes(
            value.view(torch.uint8).numpy()
        ), name


@pytest.mark.parametrize("where", PLACES)
def test_dcp_convert_is_byte_identical(
    where: str, fsdp_fixtures: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, base = str(fsdp_fixtures / "dcp"), str(fsdp_fixtures / "base")
    _same_as_host(src, tmp_path, monkeypatch, where, base=base)


@pytest.fixture(scope="module")
def deepspeed_cases(request: pytest.FixtureRequest) -> Path:
    """The DeepSpeed fixtures; where deepspeed is absent (the GPU image) only a cached copy."""
    cached = any(FIXTURES.glob("deepspeed-*/_COMPLETE"))
    if importlib.util.find_spec("deepspeed") is None and not cached:
        pytest.skip("deepspeed is not installed and .fixtures/deepspeed-* is not here: carry it")
    root: Path = request.getfixturevalue("ds_root")
    return root


@pytest.mark.parametrize("where", PLACES)
@pytest.mark.parametrize("case", ["stage3_ws3", "stage2"])
def test_deepspeed_convert_is_byte_identical(
    where: str, case: str, deepspeed_cases: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _same_as_host(ckpt(deepspeed_cases, case), tmp_path, monkeypatch, where)


@pytest.mark.parametrize("where", PLACES)
def test_verify_against_merges_the_reference_on_the_device(
    where: str, fsdp_fixtures: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`verify --against REF --device`: REF's pieces go through the device path; the verdict is
    the host path's, for a right output and for one with a flipped value."""
    from ckpt_core.proof.verify_dir import verify_dir

    src, base = str(fsdp_fixtures / "dcp"), str(fsdp_fixtures / "base")
    out = tmp_path / "out"
    convert(src, str(out), ConvertOptions(dtype="fp32", base=base))
    seen = _Seen(monkeypatch)
    flag = _on_device(where, monkeypatch)
    assert verify_dir(str(out), against=src, base=base, device=flag).ok
    assert seen.names
    from safetensors.torch import load_file, save_file

    tensors = load_file(out / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] += 1
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    report = verify_dir(str(out), against=src, base=base, device=flag)
    assert not report.ok and name in report.text()


def _same_as_host(
    src: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, base: str | None = None
) -> None:
    dtypes: tuple[TargetDtype, ...] = ("fp16", "bf16")
    for dtype in dtypes:
        options = ConvertOptions(dtype=dtype, base=base, max_shard_bytes=200_000)
        convert(src, str(tmp_path / f"host-{dtype}"), options)
    seen = _Seen(monkeypatch)
    flag = _on_device(where, monkeypatch)
    tensors = 0
    for dtype in dtypes:
        options = ConvertOptions(dtype=dtype, base=base, max_shard_bytes=200_000, device=flag)
        out = tmp_path / f"device-{dtype}"
        result = convert(src, str(out), options)
        assert result.report is not None and result.report.ok
        assert _digests(out) == _digests(tmp_path / f"host-{dtype}")
        tensors += result.report.tensors
    assert seen.names and len(seen.names) == tensors


# -- on a GPU: memory stays one window, not the model ------------------------------------------


@needs_cuda
def test_cuda_device_memory_is_one_tensor_not_the_model(tmp_path: Path) -> None:
    tensors = {f"layer{i}": torch.randn(256, 1024) for i in range(16)}  # 16 MiB fp32 in all
    reader = _reader_of(tmp_path, tensors)
    placement = dev.placement_for("cuda")
    assert placement is not None
    stream = dev.DeviceStream(placement)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    for name, info in reader.index().items():
        assert _joined(stream.chunks(reader, info, torch.bfloat16)) == _joined(
            source_chunks(reader, info, torch.bfloat16)
        ), name
    peak = torch.cuda.max_memory_allocated() - start
    one_tensor = 256 * 1024 * (4 + 2)
    assert peak <= 2 * one_tensor, f"{peak} bytes on the device for {one_tensor}-byte tensors"
    assert os.environ.get(dev.PLACEMENT_ENV) is None
