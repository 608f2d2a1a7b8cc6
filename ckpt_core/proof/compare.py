"""The output against a reference checkpoint in any format ckptflow reads, tensor by tensor and
streamed: two bounded chunk streams (the reference's cast to the output's dtype by the one
cast rule), compared bit for bit, or within tolerances when asked, with the largest absolute
difference per tensor. Memory stays a few chunks, whatever either side's size."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass

import torch

from ckpt_core.dtypes import itemsize, output_dtype, to_safetensors
from ckpt_core.errors import FormatError
from ckpt_core.formats.protocol import Reader, TensorInfo
from ckpt_core.pipeline.conversion import Device
from ckpt_core.pipeline.device import ChunkSource, chunk_source
from ckpt_core.pipeline.stream import CHUNK_BYTES, ChunkBuffers, prefetch, source_chunks
from ckpt_core.pipeline.verify import same_bytes
from ckpt_core.proof.report import Failure, TensorDiff

__all__ = ["Comparison", "Tolerance", "compare_tensors", "target_dtype"]


@dataclass(frozen=True)
class Tolerance:
    atol: float = 0.0
    rtol: float = 0.0

    @property
    def exact(self) -> bool:
        return self.atol == 0.0 and self.rtol == 0.0


@dataclass
class Comparison:
    failures: list[Failure]
    diffs: list[TensorDiff]
    compared: int
    tied: dict[str, str]  # reference name left out of the output -> the output name it repeats


def target_dtype(out: Mapping[str, TensorInfo], recorded: str | None) -> torch.dtype | None:
    """The dtype the output was written in: the manifest's `--dtype` when it has one ("keep":
    None), else the output's most common floating-point dtype."""
    if recorded is not None:
        from ckpt_core.dtypes import TARGET_DTYPES

        return TARGET_DTYPES.get(recorded)
    floats = Counter(i.dtype for i in out.values() if i.dtype.is_floating_point)
    return floats.most_common(1)[0][0] if floats else None


def compare_tensors(
    out: Reader,
    ref: Reader,
    *,
    target: torch.dtype | None,
    tolerance: Tolerance,
    tied: Mapping[str, str],
    files_of: Mapping[str, str],
    unreadable: Collection[str] = (),
    device: Device = "cpu",
) -> Comparison:
    """`tied`: the model's tied names left out on save -> the name kept (hf_layout); a
    reference holding both has its copy compared with the output's kept tensor. `unreadable`:
    the output's indexed tensors in a broken file (reported by the index check). `device`:
    where the reference's rank pieces are merged and cast (`verify --device`), as `convert`."""
    out_index, ref_index = out.index(), ref.index()
    failures: list[Failure] = []
    pairs: list[tuple[str, str]] = []  # (output name, reference name)
    left_out = {}
    for name in ref_index:
        if name in out_index:
            pairs.append((name, name))
        elif name in tied and tied[name] in out_index:
            left_out[name] = tied[name]
            pairs.append((tied[name], name))
        elif name not in unreadable:
            failures.append(Failure("against", "", name, "in the reference, not in the output"))
    failures += [
        Failure("against", files_of.get(n, ""), n, "in the output, not in the reference")
        for n in out_index
        if n not in ref_index
    ]
    diffs: list[TensorDiff] = []
    comparable = []
    for out_name, ref_name in pairs:
        o, r = out_index[out_name], ref_index[ref_name]
        file = files_of.get(out_name, "")
        if o.shape != r.shape:
            shapes = f"shape {list(o.shape)}, the reference's {ref_name} {list(r.shape)}"
            failures.append(Failure("against", file, out_name, shapes))
            continue
        expected = output_dtype(r.dtype, target)
        if o.dtype != expected:
            dtypes = (
                f"dtype {_name(o.dtype)}, expected {_name(expected)} "
                f"(the reference's {_name(r.dtype)} after the cast)"
            )
            failures.append(Failure("against", file, out_name, dtypes))
        comparable.append((out_name, ref_name))
    reference_chunks = chunk_source(device)  # spans as source_chunks' on the wider dtype
    for out_name, ref_name, diff in _values(out, ref, comparable, tolerance, reference_chunks):
        diffs.append(diff)
        if not diff.ok:
            how = (
                "bits differ"
                if tolerance.exact
                else f"beyond atol={tolerance.atol} rtol={tolerance.rtol}"
            )
            values = (
                f"values differ from the reference's {ref_name} "
                f"({how}; max |diff| {diff.max_abs_diff:.6g})"
            )
            failures.append(Failure("against", files_of.get(out_name, ""), out_name, values))
    return Comparison(failures, diffs, len(comparable), left_out)


def _values(
    out: Reader,
    ref: Reader,
    pairs: list[tuple[str, str]],
    tolerance: Tolerance,
    reference_chunks: ChunkSource,
) -> Iterator[tuple[str, str, TensorDiff]]:
    """Both streams chunk by chunk, produced one step ahead on a thread (see stream.prefetch);
    the reference cast to the output tensor's dtype, spans equal on both sides."""
    out_index, ref_index = out.index(), ref.index()
    out_buffers = ChunkBuffers()

    def produced() -> Iterator[tuple[str, str, torch.Tensor, torch.Tensor]]:
        for out_name, ref_name in pairs:
            o, r = out_index[out_name], ref_index[ref_name]
            widest = max(itemsize(o.dtype), itemsize(r.dtype))
            step = max(1, CHUNK_BYTES // widest)  # elements per chunk, the same on both sides
            ours = source_chunks(out, o, o.dtype, step * itemsize(o.dtype), out_buffers)
            theirs = reference_chunks(ref, r, o.dtype)  # step elements a chunk, as ours
            for a, b in zip(ours, theirs, strict=True):
                yield out_name, ref_name, a, b

    current: tuple[str, str] | None = None
    worst, ok = 0.0, True
    for out_name, ref_name, a, b in prefetch(produced()):
        if current != (out_name, ref_name):
            if current is not None:
                yield _diff(current, out_index, worst, ok)
            current, worst, ok = (out_name, ref_name), 0.0, True
        if same_bytes(a, b):
            continue
        chunk_worst, chunk_ok = _chunk_diff(a, b, tolerance)
        worst = chunk_worst if chunk_worst != chunk_worst else max(worst, chunk_worst)
        ok = ok and chunk_ok
    if current is not None:
        yield _diff(current, out_index, worst, ok)


def _diff(
    names: tuple[str, str], index: Mapping[str, TensorInfo], worst: float, ok: bool
) -> tuple[str, str, TensorDiff]:
    info = index[names[0]]
    diff = TensorDiff(names[0], tuple(info.shape), _name(info.dtype), worst, ok)
    return names[0], names[1], diff


def _chunk_diff(a: torch.Tensor, b: torch.Tensor, tolerance: Tolerance) -> tuple[float, bool]:
    """Largest |a - b| (nan when NaNs sit in different places) and whether it is within the
    tolerance; bit-different chunks only (bool tensors: 1.0)."""
    x, y = a.to(torch.float64), b.to(torch.float64)
    both_nan = torch.isnan(x) & torch.isnan(y)
    if bool((torch.isnan(x) ^ torch.isnan(y)).any()):
        return float("nan"), False
    delta = torch.where(both_nan, 0.0, (x - y).abs())
    delta = torch.where(torch.isinf(x) & (x == y), 0.0, delta)  # inf == inf: no difference
    worst = float(delta.max()) if delta.numel() else 0.0
    if tolerance.exact:
        return worst, False  # bits differ (a -0.0/0.0 or NaN payload too)
    within = delta <= tolerance.atol + tolerance.rtol * y.abs()
    return worst, bool(within.all())


def _name(dtype: torch.dtype) -> str:
    try:
        return to_safetensors(dtype)
    except FormatError:  # a dtype safetensors has no name for
        return str(dtype).removeprefix("torch.")
