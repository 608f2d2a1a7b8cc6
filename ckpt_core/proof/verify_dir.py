"""`ckptflow verify OUT`: every check of a model directory, in one report.

files    sizes and sha256 against manifest.json (when OUT has one)
index    OUT's own index: files present, headers whole, no duplicates or overlaps, readable
keys     a strict load on the meta device through the auto class `architectures` names
against  (--against REF) every tensor against REF, any format ckptflow reads, streamed
logits   (--logits) both loaded as models, logits on a fixed input compared
"""

from __future__ import annotations

import json
from typing import Any

from ckpt_core.errors import CkptError, FormatError
from ckpt_core.families.model_config import CONFIG, read_config
from ckpt_core.io.storage import Location
from ckpt_core.pipeline.conversion import Device, options_from
from ckpt_core.pipeline.manifest import MANIFEST
from ckpt_core.pipeline.source import open_source
from ckpt_core.pipeline.stream import release_freed_memory
from ckpt_core.proof.compare import Tolerance, compare_tensors, target_dtype
from ckpt_core.proof.files import check_files
from ckpt_core.proof.logits import compare_logits
from ckpt_core.proof.report import Failure, ProofReport
from ckpt_core.proof.strict_load import check_keys

__all__ = ["open_reference", "verify_dir"]


def verify_dir(
    out_url: str,
    *,
    against: str | None = None,
    base: str | None = None,
    tolerance: Tolerance | None = None,
    logits: bool = False,
    against_format: str | None = None,
    device: Device = "cpu",
) -> ProofReport:
    """Run every check that applies; a check that cannot run says why. `base`: the config to
    check OUT's keys against when OUT has none, and for reading REF (its prefixes, layout)."""
    release_freed_memory()
    tolerance = tolerance or Tolerance()
    root = Location(out_url)
    if not root.isdir():
        raise FormatError(f"{out_url}: no such directory: verify checks a model directory")
    report = ProofReport(out_url)
    files = check_files(root)
    if root.exists(MANIFEST):
        report.add("files", files.manifest_failures, files.manifest)
    else:
        report.skip("files", files.manifest)
    report.add("index", files.index_failures, files.index)
    out = files.reader
    config, config_at = _config(root, base)
    layout = None
    if out is None:
        report.skip("keys", "no readable weights")
    elif config is None:
        report.skip("keys", f"no {CONFIG} in OUT (pass --base DIR to check the keys)")
    else:
        try:
            keys = check_keys(
                out.index(),
                config,
                config_at=config_at,
                files_of=files.files_of,
                index_file=files.index_file,
                unreadable=files.unreadable,
            )
            layout = keys.layout
            broken = (
                f"; {len(files.unreadable)} in broken files unchecked" if files.unreadable else ""
            )
            report.add("keys", keys.failures, keys.detail + broken)
        except CkptError as e:
            report.add("keys", [Failure("keys", CONFIG, "", str(e))], "")
    if against is None:
        report.skip("against", "no --against REF")
    elif out is not None:
        _against(
            report, out_url, files, against, base, tolerance, layout, against_format, device=device
        )
    if logits:
        _logits(report, out_url, against, base, config, config_at, layout, tolerance, files)
    return report


def _config(root: Location, base: str | None) -> tuple[dict[str, Any] | None, str]:
    config = read_config(root)
    if config is not None:
        return config, root.file(CONFIG)
    if base is not None:
        return read_config(Location(base)), Location(base).file(CONFIG)
    return None, ""


def open_reference(against: str, out_url: str, base: str | None, against_format: str | None) -> Any:
    """REF opened as `convert` opens a source: its config (else OUT's or --base's) lays its
    names out as save_pretrained writes them."""
    options = options_from(base=base or out_url, dtype="keep", format=against_format)
    return open_source(against, options)


def _recorded_dtype(root: Location) -> str | None:
    if not root.exists(MANIFEST):
        return None
    try:
        value = json.loads(root.read_text(MANIFEST))["options"]["dtype"]
    except (ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, str) else None


def _against(
    report: ProofReport,
    out_url: str,
    files: Any,
    against: str,
    base: str | None,
    tolerance: Tolerance,
    layout: Any,
    against_format: str | None,
    *,
    device: Device,
) -> None:
    try:
        ref, source = open_reference(against, out_url, base, against_format)
    except CkptError as e:
        report.add("against", [Failure("against", against, "", str(e))], "")
        return
    target = target_dtype(files.reader.index(), _recorded_dtype(Location(out_url)))
    tied = dict(layout.tied) if layout is not None else {}
    result = compare_tensors(
        files.reader,
        ref,
        target=target,
        tolerance=tolerance,
        tied=tied,
        files_of=files.files_of,
        unreadable=files.unreadable,
        device=device,
    )
    report.diffs = result.diffs
    worst = max((d.max_abs_diff for d in result.diffs), default=0.0)
    how = (
        "bit-identical"
        if tolerance.exact
        else f"within atol={tolerance.atol} rtol={tolerance.rtol}"
    )
    detail = (
        f"{against} ({source.format}): {result.compared} tensors {how} after the cast "
        f"(max |diff| {worst:.6g})"
        + (f"; tied copies left out: {', '.join(sorted(result.tied))}" if result.tied else "")
    )
    failed = (
        f"{against} ({source.format}): {len(result.failures)} problem(s), max |diff| {worst:.6g}"
    )
    report.add("against", result.failures, detail, detail=failed)
    report.facts["against"] = {"url": against, "format": source.format, "compared": result.compared}


def _logits(
    report: ProofReport,
    out_url: str,
    against: str | None,
    base: str | None,
    config: dict[str, Any] | None,
    config_at: str,
    layout: Any,
    tolerance: Tolerance,
    files: Any,
) -> None:
    if against is None or config is None or layout is None or files.reader is None:
        report.skip("logits", "needs --against REF and a config (OUT's or --base's)")
        return
    try:
        ref, _ = open_reference(against, out_url, base, None)
        target = target_dtype(files.reader.index(), _recorded_dtype(Location(out_url)))
        check = compare_logits(
            out_url,
            ref,
            config=config,
            config_at=config_at,
            architecture=layout.architecture,
            target=target,
            tolerance=tolerance,
        )
    except CkptError as e:
        report.add("logits", [Failure("logits", "", "", str(e))], "")
        return
    report.add("logits", check.failures, check.detail, detail=check.detail)
    report.facts["logits_max_abs_diff"] = check.max_abs_diff
