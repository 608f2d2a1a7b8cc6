"""What `ckptflow verify` found: one row per check, every failure naming its file and tensor,
the largest difference per compared tensor. A table for people, a dict for scripts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["Check", "Failure", "ProofReport", "Status", "TensorDiff"]

Status = Literal["ok", "FAILED", "skipped"]


@dataclass(frozen=True)
class Failure:
    check: str  # files, index, keys, against, logits
    file: str  # the file it concerns ("" for none)
    tensor: str  # the tensor it concerns ("" for none)
    message: str

    def line(self) -> str:
        where = ": ".join(p for p in (self.file, self.tensor) if p)
        return f"{where}: {self.message}" if where else self.message


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str


@dataclass(frozen=True)
class TensorDiff:
    """A tensor compared with the reference: the largest absolute difference after the cast
    (0.0 when bit-identical; nan where one side holds a NaN the other does not)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    max_abs_diff: float
    ok: bool


@dataclass
class ProofReport:
    out_url: str
    checks: list[Check] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    diffs: list[TensorDiff] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures and all(c.status != "FAILED" for c in self.checks)

    def add(self, name: str, failures: list[Failure], ok_detail: str, *, detail: str = "") -> None:
        """Record one check: ok with `ok_detail`, or FAILED with `detail` (default: a count)."""
        self.failures.extend(failures)
        if failures:
            self.checks.append(Check(name, "FAILED", detail or f"{len(failures)} problem(s)"))
        else:
            self.checks.append(Check(name, "ok", ok_detail))

    def skip(self, name: str, why: str) -> None:
        self.checks.append(Check(name, "skipped", why))

    def verdict(self) -> str:
        if self.ok:
            return "OK: every check holds"
        return f"FAILED: {len(self.failures)} problem(s)"

    def as_dict(self) -> dict[str, Any]:
        return {
            "out": self.out_url,
            "ok": self.ok,
            "verdict": self.verdict(),
            "checks": [asdict(c) for c in self.checks],
            "failures": [asdict(f) for f in self.failures],
            "tensors": [
                {**asdict(d), "shape": list(d.shape), "max_abs_diff": _number(d.max_abs_diff)}
                for d in self.diffs
            ],
            **self.facts,
        }

    def text(self, *, most_failures: int = 50, most_diffs: int = 10) -> str:
        width = max([len(c.name) for c in self.checks] + [5])
        lines = [f"verify {self.out_url}", f"  {'check':<{width}}  {'result':<7}  detail"]
        lines += [f"  {c.name:<{width}}  {c.status:<7}  {c.detail}" for c in self.checks]
        worst = sorted(
            (d for d in self.diffs if d.max_abs_diff != 0.0),
            key=lambda d: -d.max_abs_diff if d.max_abs_diff == d.max_abs_diff else float("-inf"),
        )[:most_diffs]
        if worst:
            lines.append("  largest differences (tensor, dtype, max |diff|):")
            lines += [f"    {d.name}  {d.dtype}  {d.max_abs_diff:.6g}" for d in worst]
        if self.failures:
            lines.append("  failures:")
            lines += [f"    {f.line()}" for f in self.failures[:most_failures]]
            if len(self.failures) > most_failures:
                lines.append(
                    f"    ... (+{len(self.failures) - most_failures} more; --json lists all)"
                )
        lines.append(f"  verdict: {self.verdict()}")
        return "\n".join(lines)

    def markdown(self) -> str:
        rows = ["| check | result | detail |", "| --- | --- | --- |"]
        rows += [f"| {c.name} | {c.status} | {c.detail} |" for c in self.checks]
        rows += [f"| failure | {f.check} | {f.line()} |" for f in self.failures[:50]]
        return "\n".join(rows)


def _number(value: float) -> float | str:
    """JSON has no nan or inf: those become strings."""
    return value if value == value and abs(value) != float("inf") else str(value)
