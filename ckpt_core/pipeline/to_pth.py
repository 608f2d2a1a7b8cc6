"""`--to pth`: one plain state dict in one `torch.save` pickle, as MiniMind-style trainers load
it (`model.load_state_dict(torch.load of the file, strict=True)`).

A pickle holds the whole dict, so this target cannot stream: the output is built in memory,
one copy of it (each tensor cast straight into its own output buffer, chunk by chunk; a tied
copy is the same tensor, stored once, as `model.state_dict()` holds it), and `torch.save` writes
the storages from those buffers without another copy. It is read back for verification by
ckptflow's own lazy torch-file reader (the allow-listed unpickler), one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from ckpt_core.formats.protocol import OpenOptions
from ckpt_core.formats.torch_file import TorchFileReader
from ckpt_core.io.storage import Location
from ckpt_core.pipeline.writer import FileRecord, HashingStream

__all__ = ["read_back", "write_pth"]


def write_pth(
    work: Location,
    filename: str,
    layout: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor],
    sources: Mapping[str, str],
) -> FileRecord:
    """`torch.save` of `{name: tensor}` in `layout`'s order; names that read the same source
    tensor (tied copies) share one tensor."""
    state: dict[str, torch.Tensor] = {}
    made: dict[str, torch.Tensor] = {}  # source name -> its output tensor
    for name, _, _ in layout:
        source = sources.get(name, name)
        if source not in made:
            made[source] = produce(name)
        state[name] = made[source]
    with work.writing(filename) as handle:
        stream = HashingStream(handle)
        torch.save(state, stream)  # type: ignore[arg-type]  # a binary file object
    return stream.record(filename)


def read_back(work: Location, filename: str) -> TorchFileReader:
    return TorchFileReader(work, filename, OpenOptions())
