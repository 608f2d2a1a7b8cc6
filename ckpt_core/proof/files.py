"""The files of a model directory: sizes and sha256 against its `manifest.json`, and, with or
without one, its own index: every indexed file present, every header whole, every tensor in
one file only and readable, nothing beside the index. Each problem is one `Failure` naming
the file and, where one is concerned, the tensor."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ckpt_core.errors import CkptError, FormatError
from ckpt_core.formats.hf import (
    BIN_INDEX,
    BIN_SINGLE,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    SAFETENSORS_SUFFIX,
    StoredTensor,
    read_weight_map,
)
from ckpt_core.formats.protocol import OpenOptions, Reader, SourceFacts, TensorInfo, lookup
from ckpt_core.formats.registry import get_format
from ckpt_core.formats.safetensors_header import MAX_HEADER_BYTES, read_header
from ckpt_core.io.storage import Location
from ckpt_core.pipeline.manifest import MANIFEST, SUCCESS
from ckpt_core.pipeline.stream import ChunkBuffers, source_chunks
from ckpt_core.pipeline.writer import hash_file
from ckpt_core.proof.report import Failure

__all__ = ["FilesCheck", "OutputTensors", "check_files"]


@dataclass
class OutputTensors:
    """The output's readable safetensors tensors, read by byte range (a Reader for the
    comparisons; built from the headers that parsed, so one broken shard leaves the rest
    comparable)."""

    root: Location
    tensors: dict[str, StoredTensor] = field(default_factory=dict)

    def index(self) -> Mapping[str, TensorInfo]:
        return {n: TensorInfo(n, t.dtype, t.shape) for n, t in self.tensors.items()}

    def read(self, name: str) -> torch.Tensor:
        return lookup(self.tensors, name, self.root.url).materialize()

    def read_range(
        self, name: str, start: int, count: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        return lookup(self.tensors, name, self.root.url).read_range(start, count, out)

    def facts(self) -> SourceFacts:
        return SourceFacts("hf-safetensors", sorted({t.file for t in self.tensors.values()}))

    def asset_dirs(self) -> list[Location]:
        return [self.root]


@dataclass
class FilesCheck:
    manifest: str  # what the manifest check found (or why there was none)
    index: str  # what the index check found
    manifest_failures: list[Failure]
    index_failures: list[Failure]
    reader: Reader | None  # None: no weights could be read at all
    files_of: dict[str, str]  # tensor -> the file holding it
    index_file: str = ""  # the index json, or the one weights file
    unreadable: frozenset[str] = frozenset()  # indexed tensors in a file that could not be read


def check_files(root: Location, *, read_all: bool = True) -> FilesCheck:
    """`read_all`: read every tensor's bytes when no manifest vouched for the file's hash."""
    manifest_failures, hashed, manifest_detail = _check_manifest(root)
    names = set(root.listdir())
    reader: _Files | None
    if SAFETENSORS_INDEX in names or SAFETENSORS_SINGLE in names:
        failures, reader, detail = _check_safetensors(root, names)
    elif BIN_INDEX in names or BIN_SINGLE in names:
        failures, reader, detail = _check_bin(root)
    else:
        none = (
            f"{root.url}: no {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {BIN_SINGLE} or {BIN_INDEX}"
        )
        if not root.exists(MANIFEST):
            raise FormatError(f"{none}: not a model directory")
        # A manifest without its weights: its check has said which files are gone.
        failures = [Failure("index", "", "", f"{none}: the weights are gone")]
        return FilesCheck(manifest_detail, "no weights", manifest_failures, failures, None, {})
    files_of = reader.files_of() if reader else {}
    unreadable = frozenset(reader.unreadable) if reader else frozenset()
    out_reader = reader.reader if reader else None
    if read_all and out_reader is not None:
        failures += _read_every_tensor(out_reader, files_of, skip_files=hashed)
    index_file = next(
        (n for n in (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, BIN_INDEX, BIN_SINGLE) if n in names),
        "",
    )
    return FilesCheck(
        manifest_detail,
        detail,
        manifest_failures,
        failures,
        out_reader,
        files_of,
        index_file,
        unreadable,
    )


def _check_manifest(root: Location) -> tuple[list[Failure], set[str], str]:
    """Failures, the files whose sha256 matched, and what was checked."""
    if not root.exists(MANIFEST):
        return [], set(), "no manifest.json: verified from the index alone"
    failures = []
    if not root.exists(SUCCESS):
        unfinished = "missing: the conversion that wrote this directory did not finish; rerun it"
        failures.append(Failure("files", SUCCESS, "", unfinished))
    try:
        listed = json.loads(root.read_text(MANIFEST))["files"]
        if not isinstance(listed, dict):
            raise TypeError("files is not an object")
    except (ValueError, KeyError, TypeError) as e:
        return [Failure("files", MANIFEST, "", f"unreadable ({e})")], set(), "manifest unreadable"
    hashed: set[str] = set()
    for name, record in sorted(listed.items()):
        if not isinstance(record, dict):
            failures.append(Failure("files", MANIFEST, name, "malformed entry"))
            continue
        if not root.exists(name):
            failures.append(Failure("files", name, "", "listed in manifest.json but missing"))
            continue
        size = root.size(name)
        if size != record.get("size"):
            said = f"{size} bytes, manifest.json says {record.get('size')} (truncated or replaced)"
            failures.append(Failure("files", name, "", said))
            continue
        if hash_file(root, name).sha256 != record.get("sha256"):
            failures.append(
                Failure("files", name, "", "sha256 differs from manifest.json (its bytes changed)")
            )
            continue
        hashed.add(name)
    weights = {n for n in root.listdir() if n.endswith((SAFETENSORS_SUFFIX, ".bin"))}
    failures += [
        Failure("files", n, "", "a weight file manifest.json does not list")
        for n in sorted(weights - set(listed))
    ]
    return failures, hashed, f"{len(listed)} files: sizes and sha256 match manifest.json"


@dataclass
class _Files:
    reader: Reader
    owner: dict[str, str]
    unreadable: set[str] = field(default_factory=set)

    def files_of(self) -> dict[str, str]:
        return dict(self.owner)


def _check_safetensors(root: Location, names: set[str]) -> tuple[list[Failure], _Files, str]:
    failures: list[Failure] = []
    weight_map: dict[str, str] | None = None
    if SAFETENSORS_INDEX in names:
        try:
            weight_map = read_weight_map(root, SAFETENSORS_INDEX)
        except CkptError as e:
            failures.append(Failure("index", SAFETENSORS_INDEX, "", str(e)))
        listed = set(weight_map.values()) if weight_map else None
        files = sorted(listed or {n for n in names if n.endswith(SAFETENSORS_SUFFIX)})
    else:
        files = [SAFETENSORS_SINGLE]
    out = OutputTensors(root)
    owner: dict[str, str] = {}
    for file in files:
        try:
            header = read_header(root, file)
        except FormatError as e:
            past = ", ".join(_tensors_past_end(root, file)[:10])
            message = str(e).removeprefix(root.file(file) + ": ")
            failures.append(Failure("index", file, past, message))
            continue
        for name, entry in header.entries.items():
            if name in owner:
                failures.append(Failure("index", file, name, f"also in {owner[name]}"))
                continue
            owner[name] = file
            out.tensors[name] = StoredTensor(root, file, entry)
    unreadable: set[str] = set()
    if weight_map is not None:
        readable = set(files) - {f.file for f in failures}
        unreadable = {n for n, f in weight_map.items() if f not in readable}
        for name, file in sorted(weight_map.items()):
            if file in readable and owner.get(name) != file:
                absent = f"indexed in {SAFETENSORS_INDEX} but not in the file"
                failures.append(Failure("index", file, name, absent))
        failures += [
            Failure("index", file, name, f"not in {SAFETENSORS_INDEX}")
            for name, file in sorted(owner.items())
            if name not in weight_map
        ]
    detail = f"{len(files)} safetensors file(s), {len(owner)} tensors: headers whole, no overlaps"
    return failures, _Files(out, owner, unreadable), detail


def _tensors_past_end(root: Location, file: str) -> list[str]:
    """The tensors of a truncated file that lie (partly) past its end, from its header JSON
    when that much of it is there (read_header refused the file as a whole)."""
    try:
        size = root.size(file)
        (header_bytes,) = struct.unpack("<Q", root.read_bytes(file, 0, 8))
        if header_bytes > MAX_HEADER_BYTES or 8 + header_bytes > size:
            return []
        parsed = json.loads(root.read_bytes(file, 8, 8 + header_bytes))
        start = 8 + header_bytes
        return sorted(
            name
            for name, value in parsed.items()
            if name != "__metadata__" and start + int(value["data_offsets"][1]) > size
        )
    except (ValueError, KeyError, TypeError, struct.error, OSError):
        return []


def _check_bin(root: Location) -> tuple[list[Failure], _Files | None, str]:
    """pytorch_model.bin (+ index): opened by the hf format's own reader, which refuses
    duplicates and index/shard disagreements as one error."""
    try:
        reader = get_format("hf").open(root, OpenOptions())
        index = reader.index()
    except CkptError as e:
        return [Failure("index", BIN_INDEX, "", str(e))], None, "unreadable"
    detail = f"{len(reader.facts().files)} .bin file(s), {len(index)} tensors"
    return [], _Files(reader, {}), detail


def _read_every_tensor(
    reader: Reader, files_of: dict[str, str], *, skip_files: set[str]
) -> list[Failure]:
    """Every tensor read once, in bounded chunks, unless its file's sha256 already matched."""
    failures = []
    buffers = ChunkBuffers()
    for name, info in reader.index().items():
        if files_of.get(name) in skip_files:
            continue
        try:
            for _ in source_chunks(reader, info, info.dtype, buffers=buffers):
                pass
        except (CkptError, OSError, RuntimeError, IndexError) as e:
            failures.append(Failure("index", files_of.get(name, ""), name, f"unreadable ({e})"))
    return failures
