"""The safety boundary (ckpt_core/formats/unpickle.py): every allow-listed global is real, no
file can change a shared stand-in (and so what a later file reads), each format allows only
its own fragments, and no other module reads a pickle."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import struct
import tokenize
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt_core.errors import FormatError, UnsafeFileError
from ckpt_core.formats import unpickle
from ckpt_core.formats.registry import open_reader
from ckpt_core.formats.torchzip import LazyTorchFile
from ckpt_core.formats.unpickle import DEEPSPEED, TENSORS, restricted_load
from ckpt_core.io.storage import Location

REPO = Path(__file__).resolve().parents[1]


def fragments() -> dict[str, Mapping[tuple[str, str], Any]]:
    """Every allow-list fragment the module exports (found, so a new one is covered too)."""
    found = {}
    for name in unpickle.__all__:
        value = getattr(unpickle, name)
        if isinstance(value, Mapping) and value and all(isinstance(k, tuple) for k in value):
            found[name] = value
    return found


def allowed() -> Iterator[tuple[str, Mapping[tuple[str, str], Any], str, str]]:
    for fragment_name, fragment in fragments().items():
        for module, name in fragment:
            yield fragment_name, fragment, module, name


# -- pickles written opcode by opcode ---------------------------------------------------------
def op_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def op_text(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def op_dict(**items: bytes) -> bytes:
    return b"}" + b"".join(op_text(key) + value + b"s" for key, value in items.items())


def build_onto(module: str, name: str, state: bytes) -> bytes:
    """A pickle that BUILDs `state` onto the global module.name, drops it and returns {}."""
    return b"\x80\x02" + op_global(module, name) + state + b"b" + b"0" + b"}" + b"."


def as_dict_state(**items: bytes) -> bytes:
    return op_dict(**items)  # BUILD updates the object's __dict__


def as_slot_state(**items: bytes) -> bytes:
    return b"N" + op_dict(**items) + b"\x86"  # (None, slots): BUILD calls setattr


STATES = {"dict": as_dict_state, "slots": as_slot_state}


def write_torch_zip(path: Path, data_pkl: bytes) -> None:
    """A torch.save archive around a hand-written data.pkl."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")


# -- the tests --------------------------------------------------------------------------------
def test_every_allow_listed_global_exists_in_the_installed_packages() -> None:
    """A name that does not resolve is dead (torch moved it, or it never existed)."""
    assert set(fragments()) >= {"TENSORS", "DCP_METADATA", "DTENSOR", "DEEPSPEED"}
    missing = []
    for fragment_name, _, module, name in allowed():
        if module.partition(".")[0] == "deepspeed" and not importlib.util.find_spec("deepspeed"):
            continue
        try:
            found: Any = importlib.import_module(module)
            for part in name.split("."):
                found = getattr(found, part)
        except (ImportError, AttributeError) as e:
            missing.append(f"{fragment_name}: {module}.{name} ({e})")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("state", STATES)
def test_no_stand_in_can_be_changed_through_a_pickle(state: str) -> None:
    """BUILD onto any allow-listed global is refused and leaves the stand-in as it was."""
    probe = STATES[state](probe=b"K\x01")
    for fragment_name, fragment, module, name in allowed():
        with pytest.raises(FormatError):
            restricted_load(build_onto(module, name, probe), "probe.pkl", fragment)
        stand_in = fragment[(module, name)]
        assert not hasattr(stand_in, "probe"), f"{fragment_name}: {module}.{name} was changed"


@pytest.mark.parametrize("state", STATES)
def test_a_hostile_file_cannot_change_the_dtype_the_next_file_is_read_with(
    tmp_path: Path, state: str
) -> None:
    benign = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 0.5
    torch.save({"w": benign}, tmp_path / "benign.pt")
    # Sets dtype=int8 on the stand-in for torch.FloatStorage, which every file shares.
    hostile = build_onto("torch", "FloatStorage", STATES[state](dtype=op_global("torch", "int8")))
    write_torch_zip(tmp_path / "hostile.pt", hostile)
    with pytest.raises(FormatError, match="hostile.pt"):
        LazyTorchFile(Location(str(tmp_path)), "hostile.pt")

    reader = open_reader(str(tmp_path / "benign.pt"))
    assert reader.index()["w"].dtype == torch.float32
    assert torch.equal(reader.read("w"), benign)


def test_a_global_of_another_formats_fragment_is_refused(tmp_path: Path) -> None:
    """Fragments are per format: argparse.Namespace is a DeepSpeed stand-in, not a tensor one."""
    torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=0.1)}, tmp_path / "m.pt")
    with pytest.raises(UnsafeFileError, match="argparse.Namespace"):
        open_reader(str(tmp_path / "m.pt"))
    obj = LazyTorchFile(Location(str(tmp_path)), "m.pt", extra_globals=DEEPSPEED).obj
    assert obj["args"].field("lr") == 0.1
    assert ("argparse", "Namespace") not in TENSORS


def code_lines(path: Path) -> list[str]:
    """The file's lines with comments and string literals (docstrings) blanked: a docstring may
    say what the output is for (`torch.load(path)`) without the module reading a pickle."""
    lines = path.read_text().splitlines()
    with path.open("rb") as source:
        for token in tokenize.tokenize(source.readline):
            if token.type not in (tokenize.COMMENT, tokenize.STRING):
                continue
            (row, col), (end_row, end_col) = token.start, token.end
            for number in range(row, end_row + 1):
                line = lines[number - 1]
                lo = col if number == row else 0
                hi = end_col if number == end_row else len(line)
                lines[number - 1] = line[:lo] + " " * (hi - lo) + line[hi:]
    return lines


def test_no_other_module_reads_a_pickle() -> None:
    """Every pickle in ckpt_core goes through unpickle.py (its parts beside it are grepped too:
    none of them may unpickle); torch.load is never used."""
    reads = re.compile(r"^\s*(import pickle|from pickle )|Unpickler|torch\.load\(|pickle\.loads?\(")
    the_one = REPO / "ckpt_core" / "formats" / "unpickle.py"
    modules = sorted((REPO / "ckpt_core").rglob("*.py"))
    assert the_one in modules and any(p.name.startswith("unpickle_") for p in modules)
    offenders = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in modules
        if path != the_one
        for number, line in enumerate(code_lines(path), start=1)
        if reads.search(line)
    ]
    assert not offenders, "\n".join(offenders)
    assert any(reads.search(line) for line in code_lines(the_one))
