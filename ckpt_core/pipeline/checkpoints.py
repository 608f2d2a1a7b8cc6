"""A trainer's output directory as a source: it holds several checkpoints, not one.

HF `Trainer` writes `output_dir/checkpoint-N/`, accelerate's automatic naming
`project_dir/checkpoints/checkpoint_N/`. Pointed at such a parent, a conversion either says
which checkpoints it holds (newest first) and how to pick one, or, with `--latest`, converts
the newest (highest N). Resolved at the front ends, before planning, so the plan and the
manifest name the checkpoint actually converted.
"""

from __future__ import annotations

import re

from ckpt_core.errors import FormatError
from ckpt_core.formats.registry import formats
from ckpt_core.io.storage import Location

__all__ = ["CHECKPOINT_RE", "checkpoint_dirs", "resolve_checkpoint"]

CHECKPOINT_RE = re.compile(r"^checkpoint[-_](\d+)$")
_SHOWN = 6  # checkpoints named in the refusal


def checkpoint_dirs(root: Location) -> list[str]:
    """The `checkpoint-N` / `checkpoint_N` directories directly below `root`, newest first."""
    found = [
        (int(match.group(1)), name)
        for name in root.listdir()
        if (match := CHECKPOINT_RE.match(name)) and root.isdir(name)
    ]
    return [name for _, name in sorted(found, reverse=True)]


def resolve_checkpoint(src_url: str, *, latest: bool = False) -> str:
    """The checkpoint URL to convert: `src_url` itself, or with `latest` its newest
    `checkpoint-N`. A directory that only holds checkpoints (no format reads it as one) is
    refused, naming them."""
    root = Location(src_url)
    found = checkpoint_dirs(root) if root.isdir() else []
    if latest:
        if not found:
            raise FormatError(
                f"{src_url}: --latest, but there are no checkpoint-N directories in it; "
                "pass the checkpoint itself without --latest"
            )
        return root.child(found[0]).url
    if found and not any(fmt.detect(root) for fmt in formats()):
        shown = ", ".join(found[:_SHOWN]) + (
            f" (+{len(found) - _SHOWN} more)" if len(found) > _SHOWN else ""
        )
        raise FormatError(
            f"{src_url}: a training output directory holding {len(found)} checkpoints "
            f"(newest first: {shown}); convert one of them ({root.child(found[0]).url}), or "
            "pass --latest to convert the newest"
        )
    return src_url
