"""Run a snippet in a fresh interpreter and report wall time and peak RSS above its baseline.

The baseline is the child's resident set after its imports; the peak is VmHWM at the end, so
`peak - baseline` is what the work itself cost.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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
print("__MEASURE__" + json.dumps({{"wall_s": _wall, "base_mb": _base / 1024, "peak_mb": _rss_kb("VmHWM:") / 1024}}))
"""


def settle() -> None:
    """Flush what earlier runs left dirty in the page cache, untimed, before each variant:
    otherwise the kernel throttles a variant's writes while it writes back the previous
    variant's output (measured here: the same 1 GB write took 0.2 s or 2.2 s)."""
    os.sync()


def ratios(ours: str, theirs: str, runs: dict[str, list[dict[str, float]]]) -> str:
    """Issue 3's two ratios from interleaved repeats: wall time by the fastest run of each (the
    least disturbed) and by the medians (this VM's page faults vary run to run), peak RSS by
    the largest."""
    a, b = runs[ours], runs[theirs]
    wall_min = min(r["wall_s"] for r in a) / min(r["wall_s"] for r in b)
    wall_median = statistics.median(r["wall_s"] for r in a) / statistics.median(
        r["wall_s"] for r in b
    )
    rss = max(r["peak_rss"] for r in a) / max(r["peak_rss"] for r in b)
    return (
        f"{ours} / {theirs}: wall {wall_min:.2f} by fastest runs, {wall_median:.2f} by medians "
        f"(target <= 0.5); peak RSS {rss:.3f} (target <= 0.125)"
    )


@dataclass(frozen=True)
class Figure:
    name: str
    wall_s: float
    base_mb: float
    peak_mb: float

    @property
    def above_base_mb(self) -> float:
        return self.peak_mb - self.base_mb


def measure(name: str, imports: str, body: str) -> Figure:
    code = _WRAPPER.format(imports=textwrap.dedent(imports), body=textwrap.dedent(body))
    settle()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("__MEASURE__"))
    values = json.loads(line.removeprefix("__MEASURE__"))
    return Figure(name, values["wall_s"], values["base_mb"], values["peak_mb"])


def table(runs: Mapping[str, Sequence[Figure]], data_mb: float) -> str:
    """One row per variant: the fastest and the median wall time of its runs (this VM's memory
    makes a run's first touch of new pages slow or fast from one run to the next), MB/s by the
    fastest, and the largest peak RSS."""
    rows = [
        f"{'variant':<44} {'wall s':>7} {'median':>7} {'MB/s':>7} {'peak RSS MB':>12} "
        f"{'above base MB':>14}"
    ]
    for name, figures in runs.items():
        fastest = min(f.wall_s for f in figures)
        largest = max(figures, key=lambda f: f.peak_mb)
        rows.append(
            f"{name:<44} {fastest:7.2f} {statistics.median(f.wall_s for f in figures):7.2f} "
            f"{data_mb / fastest:7.0f} {largest.peak_mb:12.0f} {largest.above_base_mb:14.0f}"
        )
    return "\n".join(rows)
