"""Bounded memory and time whatever a file claims (issue 11, items 4, 5, 8): claimed sizes are
checked against the bytes really there before anything is allocated, allow-listed pickle
callables take only the argument types real files pass, safetensors/index JSON is bounded
before parsing, and a transposed tensor is rebuilt once, not once per range. Each hostile file
is refused through `ckptflow convert` with one line naming the file, exit 2, nothing
published."""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed import checkpoint as dcp

from ckpt_core.formats import torchzip
from ckpt_core.formats.torchzip import LazyTensor, LazyTorchFile
from ckpt_core.io.storage import Location
from ckptflow.cli import main

REPO = Path(__file__).resolve().parents[1]


def refuse(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], *expected: str) -> str:
    dst = tmp_path / "dst"
    code = main(["convert", str(src), str(dst)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("ckptflow: error:"), err[-2000:]
    assert len(lines[0]) < 2000, lines[0][:300]
    for text in (str(src.name), *expected):
        assert text in lines[0], lines[0]
    assert not dst.exists() and not list(tmp_path.glob(".dst*"))
    return lines[0]


# -- torch.save files with a hand-written data.pkl --------------------------------------------
def op_int(n: int) -> bytes:
    return b"L" + str(n).encode() + b"L\n"


def op_text(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def op_tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def op_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def tensor_pickle(
    numel: int, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]
) -> bytes:
    """{"w": _rebuild_tensor_v2(storage("0", FloatStorage, numel), offset, shape, stride, ...)}"""
    storage = (
        op_tuple(
            op_text("storage"),
            op_global("torch", "FloatStorage"),
            op_text("0"),
            op_text("cpu"),
            op_int(numel),
        )
        + b"Q"
    )
    args = op_tuple(
        storage,
        op_int(offset),
        op_tuple(*map(op_int, shape)),
        op_tuple(*map(op_int, stride)),
        b"\x89",
        op_global("collections", "OrderedDict") + b")R",
    )
    return (
        b"\x80\x02}"
        + op_text("w")
        + op_global("torch._utils", "_rebuild_tensor_v2")
        + args
        + b"Rs."
    )


def with_pickle(path: Path, data_pkl: bytes) -> Path:
    """A real torch.save of four floats, its data.pkl replaced."""
    real = path.with_suffix(".real")
    torch.save({"w": torch.arange(4.0)}, real)
    with zipfile.ZipFile(real) as old, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            data = data_pkl if info.filename.endswith("/data.pkl") else old.read(info)
            new.writestr(info.filename, data)
    real.unlink()
    return path


def nested(width: int, depth: int) -> bytes:
    """A list of `width` references to a list of `width` references ... (`depth` levels): a few
    KB of pickle whose str() or hash() visits width**depth elements."""
    ops = b"(" + b"K\x00" * width + b"l" + b"q\x00"
    for level in range(1, depth):  # each level only in the memo (POP), the last on the stack
        ops += b"0(" + (b"h" + bytes([level - 1])) * width + b"l" + b"q" + bytes([level])
    return ops


def call_pickle(module: str, name: str, arg: bytes) -> bytes:
    """{"x": module.name(arg)} around a valid tensor entry."""
    return (
        tensor_pickle(4, 0, (4,), (1,))[:-1]
        + op_text("x")
        + op_global(module, name)
        + arg
        + b"\x85Rs."
    )


CLAIMS = {
    "2^80_elements": (tensor_pickle(4, 0, (2**40, 2**40), (2**40, 1)), "reaches element"),
    "storage_beyond_record": (tensor_pickle(2**60, 0, (4,), (1,)), "its record holds 16 bytes"),
    "negative_offset": (tensor_pickle(4, -2, (2,), (1,)), "negative"),
    "offset_past_storage": (tensor_pickle(4, 3, (4,), (1,)), "reaches element 7"),
    "negative_stride": (tensor_pickle(4, 3, (4,), (-1,)), "negative"),
}


@pytest.mark.parametrize("case", sorted(CLAIMS))
def test_torch_file_claims_checked_against_record(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_pkl, expected = CLAIMS[case]
    src = with_pickle(tmp_path / "model.pth", data_pkl)
    line = refuse(src, tmp_path, capsys, "storage record '0'", expected)
    assert "Traceback" not in line


ARGUMENTS = {
    "device_of_a_list": ("torch", "device", nested(300, 3), "not a device"),
    "size_of_lists": ("torch", "Size", nested(300, 3), "not a list of ints"),
    "set_of_lists": ("builtins", "set", nested(300, 3), "non-scalar"),
}


def _rss_child(script: str) -> tuple[str, int]:
    """Run `script` in a fresh interpreter: (its stderr, peak RSS growth in MB after imports)."""
    prelude = (
        "import resource, sys\n"
        "from ckptflow.cli import main\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
    )
    tail = (
        "\nprint('RSS_MB', (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", prelude + script + tail],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "RSS_MB" in done.stdout, done.stderr[-2000:]
    return done.stderr, int(done.stdout.split("RSS_MB")[1])


def test_allow_listed_callables_take_only_their_argument_types(tmp_path: Path) -> None:
    """A few KB of pickle handing a nested list to a bare `str`/`tuple`/`set` stand-in was
    expanded to ~27M elements (str: hundreds of MB); now each is refused at once."""
    srcs = []
    for case, (module, name, arg, _expected) in sorted(ARGUMENTS.items()):
        srcs.append(with_pickle(tmp_path / f"{case}.pth", call_pickle(module, name, arg)))
        assert srcs[-1].stat().st_size < 20_000
    script = "".join(
        f"assert main(['convert', {str(s)!r}, {str(tmp_path / ('out_' + s.stem))!r}]) == 2\n"
        for s in srcs
    )
    err, rss_mb = _rss_child(script)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == len(srcs), err[-2000:]
    for line, (case, (_m, _n, _a, expected)) in zip(lines, sorted(ARGUMENTS.items()), strict=True):
        assert line.startswith("ckptflow: error:") and f"{case}.pth" in line, line
        assert expected in line and len(line) < 1000, line[:300]
    assert rss_mb < 100, f"peak RSS grew by {rss_mb} MB"
    assert not list(tmp_path.glob("*out_*"))


def test_deep_pickle_nesting_is_no_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """{"w": tensor, "x": {"k": {"k": ... 200k deep}}}: the tensor walk does not recurse (it
    raised RecursionError), so the non-tensor entry is ignored and `w` converts."""
    depth = 200_000
    deep = b"}" + (op_text("k") + b"}") * depth + b"s" * depth
    data_pkl = tensor_pickle(4, 0, (4,), (1,))[:-1] + op_text("x") + deep + b"s."
    src = with_pickle(tmp_path / "deep.pth", data_pkl)
    dst = tmp_path / "dst"
    code = main(["convert", str(src), str(dst)])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err, err[-2000:]
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(dst / "model.safetensors"))["w"], torch.arange(4.0))


# -- DCP: chunk claims against the storage entries and the files ------------------------------
def _dcp(tmp_path: Path) -> Path:
    ck = tmp_path / "ck"
    dcp.save({"w": torch.ones(4, 4)}, checkpoint_id=str(ck))
    return ck


def _edit_metadata(ck: Path, edit: Any) -> None:
    meta = pickle.loads((ck / ".metadata").read_bytes())  # our own file: trusted
    edit(meta)
    (ck / ".metadata").write_bytes(pickle.dumps(meta))


def _petabytes(meta: Any) -> None:
    md = meta.state_dict_metadata["w"]
    md.size = torch.Size([2**25, 2**25])
    md.chunks[0].sizes = torch.Size([2**25, 2**25])


def _past_file(meta: Any) -> None:
    for info in meta.storage_data.values():
        info.length = 10**12


def _negative_offset(meta: Any) -> None:
    for info in meta.storage_data.values():
        info.offset = -100


def _size_is_text(meta: Any) -> None:
    meta.state_dict_metadata["w"].size = "four by four"


DCP_CASES = {
    "petabytes": (_petabytes, "holds"),
    "past_file": (_past_file, "lies outside"),
    "negative_offset": (_negative_offset, "lies outside"),
    "size_is_text": (_size_is_text, "malformed DCP metadata"),
}


@pytest.mark.parametrize("case", sorted(DCP_CASES))
def test_dcp_claims_checked_before_allocation(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit, expected = DCP_CASES[case]
    ck = _dcp(tmp_path)
    _edit_metadata(ck, edit)
    line = refuse(ck, tmp_path, capsys, ".metadata", expected)
    if case != "size_is_text":
        assert "tensor w" in line


# -- safetensors headers and index files ------------------------------------------------------
def _safetensors(path: Path, header: dict[str, Any] | bytes, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


ENTRY = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
MALFORMED = {
    "dtype_not_text": {**ENTRY, "dtype": 7},
    "shape_of_text": {**ENTRY, "shape": ["1"]},
    "shape_of_bool": {**ENTRY, "shape": [True]},
    "shape_nested": {**ENTRY, "shape": [[1]]},
    "offsets_float": {**ENTRY, "data_offsets": [0.0, 4.0]},
    "offsets_three": {**ENTRY, "data_offsets": [0, 4, 8]},
    "offsets_negative": {**ENTRY, "data_offsets": [-4, 0]},
    "shape_overflowing": {**ENTRY, "shape": [2**62, 2**62]},
    "offset_huge_int": b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,' + b"9" * 5000 + b"]}}",
    "nested_200k_deep": b'{"w":' + b"[" * 200_000 + b"]" * 200_000 + b"}",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_safetensors_fields_are_one_line(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = MALFORMED[case]
    header = entry if isinstance(entry, bytes) else {"w": entry}
    src = tmp_path / "src"
    src.mkdir()
    _safetensors(src / "model.safetensors", header, b"\0" * 4)
    refuse(src, tmp_path, capsys, "model.safetensors")


def test_million_entry_header_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    """A header just under the 100 MB cap with a million entries cost ~2 GB and minutes; now it
    is refused from the raw bytes, and the child's peak RSS stays far under 512 MB."""
    src = tmp_path / "src"
    src.mkdir()
    parts = [
        f'"t{i}":{{"dtype":"F32","shape":[1],"data_offsets":[{4 * i},{4 * i + 4}]}}'.encode()
        for i in range(1_000_000)
    ]
    raw = b"{" + b",".join(parts) + b"}"
    raw += b" " * (99_000_000 - len(raw))
    _safetensors(src / "model.safetensors", raw, b"\0" * 4_000_000)
    index = src / "model.safetensors.index.json"
    entries = b",".join(b'"t%d":"x"' % i for i in range(1_200_000))
    index.write_bytes(b'{"weight_map":{' + entries + b"}}")
    dst = tmp_path / "dst"
    script = (
        f"assert main(['convert', {str(src)!r}, {str(dst)!r}]) == 2\n"
        f"import os; os.remove({str(index)!r})\n"
        f"assert main(['convert', {str(src)!r}, {str(dst)!r}]) == 2\n"
    )
    err, rss_mb = _rss_child(script)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 2, err[-2000:]
    assert "model.safetensors.index.json" in lines[0] and "more than" in lines[0], lines[0]
    assert "model.safetensors:" in lines[1] and "more than ckptflow reads" in lines[1], lines[1]
    assert rss_mb < 512, f"peak RSS grew by {rss_mb} MB"
    assert not dst.exists() and not list(tmp_path.glob(".dst*"))


# -- item 8: a transposed tensor read by ranges is rebuilt once -------------------------------
def test_transposed_tensor_is_materialized_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    truth = torch.arange(64 * 48, dtype=torch.float32).reshape(64, 48)
    torch.save({"w": truth.t()}, tmp_path / "t.pth")
    lazy = LazyTorchFile(Location(str(tmp_path)), "t.pth").obj["w"]
    assert isinstance(lazy, LazyTensor) and not lazy.is_contiguous()
    calls = []
    real = LazyTensor.materialize

    def counted(self: LazyTensor) -> torch.Tensor:
        calls.append(1)
        return real(self)

    monkeypatch.setattr(LazyTensor, "materialize", counted)
    step = 100
    pieces = [lazy.read_range(s, min(step, lazy.numel - s)) for s in range(0, lazy.numel, step)]
    assert len(pieces) > 30
    assert torch.equal(torch.cat(pieces), truth.t().reshape(-1))
    assert len(calls) == 1, f"materialized {len(calls)} times for {len(pieces)} ranges"
    assert getattr(torchzip._HELD, "tensor", None) is None  # dropped after the last range
