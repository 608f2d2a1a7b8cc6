"""Peak memory, per measured step: the host's resident set (Linux VmHWM, reset through
/proc/self/clear_refs so each step's peak is its own) and the CUDA allocator's peak."""

from __future__ import annotations

import contextlib
import resource
import sys
from pathlib import Path

import torch

__all__ = ["peak_device_bytes", "peak_host_bytes", "reset_peaks"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peaks(device: str) -> None:
    # "5" resets the peak resident set (Linux >= 4.0); elsewhere the process's peak is left.
    with contextlib.suppress(OSError):
        _CLEAR_REFS.write_text("5")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_host_bytes() -> int:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def peak_device_bytes(device: str) -> int | None:
    if not device.startswith("cuda"):
        return None
    return int(torch.cuda.max_memory_allocated())
