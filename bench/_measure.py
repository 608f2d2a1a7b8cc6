"""Run a snippet in a fresh interpreter and report wall time and peak RSS above its baseline.

The baseline is the child's resident set after its imports; the peak is VmHWM at the end, so
`peak - baseline` is what the work itself cost.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import statistics
import subprocess
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_WRAPPER = """
import json, time
{imports}
def _rss_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    return 0
_base = _rss_kb("VmRSS:")
_t0 = time.perf_counter()
{body}
_wall = time.perf_counter() - _t0
print("__MEASURE__" + json.dumps({{"wall_s": _wall, "baseline_rss": _base * 1024, "peak_rss": _rss_kb("VmHWM:") * 1024}}))
"""


def input_key(settings: object, *code: Any) -> str:
    """The name of a bench input generated from `settings` (JSON) by `code` (functions or
    modules, by their source): a change to either generates it again."""
    text = json.dumps(settings, sort_keys=True) + "".join(inspect.getsource(c) for c in code)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def rss_bytes(field: str = "VmRSS:") -> int:
    """This process's resident set (or, with "VmHWM:", its own peak) from /proc, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def settle() -> None:
    """Flush what earlier runs left dirty in the page cache, untimed, before each variant:
    otherwise the kernel throttles a variant's writes while it writes back the previous
    variant's output (measured here: the same 1 GB write took 0.2 s or 2.2 s)."""
    os.sync()


@dataclass(frozen=True)
class Figure:
    """One run: wall time, and resident set in MiB after the imports and at its peak."""

    name: str
    wall_s: float
    base_mib: float
    peak_mib: float

    @property
    def above_base_mib(self) -> float:
        return self.peak_mib - self.base_mib

    @classmethod
    def of(cls, name: str, run: Mapping[str, float]) -> Figure:
        """From a child's JSON line: `wall_s`, `baseline_rss` and `peak_rss` in bytes."""
        return cls(name, run["wall_s"], run["baseline_rss"] / 2**20, run["peak_rss"] / 2**20)


def ratios(
    ours: str, theirs: str, runs: Mapping[str, Sequence[Figure]], *, targets: bool = True
) -> str:
    """Issue 3's two ratios from interleaved repeats: wall time by the fastest run of each (the
    least disturbed) and by the medians (this VM's page faults vary run to run), peak RSS by
    the largest, in all and above the interpreter's baseline. `targets`: add issue 3's goals
    (for the HF-output benches)."""
    a, b = runs[ours], runs[theirs]
    wall_min = min(f.wall_s for f in a) / min(f.wall_s for f in b)
    wall_median = statistics.median(f.wall_s for f in a) / statistics.median(f.wall_s for f in b)
    rss = max(f.peak_mib for f in a) / max(f.peak_mib for f in b)
    above = max(f.above_base_mib for f in a) / max(f.above_base_mib for f in b)
    wall_goal, rss_goal = (" (target <= 0.5)", " (target <= 0.125)") if targets else ("", "")
    return (
        f"{ours} / {theirs}: wall {wall_min:.2f} by fastest runs, {wall_median:.2f} by medians"
        f"{wall_goal}; peak RSS {rss:.3f}{rss_goal}, above baseline {above:.3f}"
    )


def measure(name: str, imports: str, body: str) -> Figure:
    code = _WRAPPER.format(imports=textwrap.dedent(imports), body=textwrap.dedent(body))
    settle()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("__MEASURE__"))
    return Figure.of(name, json.loads(line.removeprefix("__MEASURE__")))


def table(runs: Mapping[str, Sequence[Figure]], data_mb: float) -> str:
    """One row per variant: the fastest and the median wall time of its runs (this VM's memory
    makes a run's first touch of new pages slow or fast from one run to the next), MB/s by the
    fastest, and the largest peak RSS."""
    rows = [
        f"{'variant':<44} {'wall s':>7} {'median':>7} {'MB/s':>7} {'peak RSS MiB':>13} "
        f"{'above base MiB':>15}"
    ]
    for name, figures in runs.items():
        fastest = min(f.wall_s for f in figures)
        largest = max(figures, key=lambda f: f.peak_mib)
        rows.append(
            f"{name:<44} {fastest:7.2f} {statistics.median(f.wall_s for f in figures):7.2f} "
            f"{data_mb / fastest:7.0f} {largest.peak_mib:13.0f} {largest.above_base_mib:15.0f}"
        )
    return "\n".join(rows)
