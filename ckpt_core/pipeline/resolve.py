"""Where a MiniMind-style trainer's pretrained weights are: `{stage}_{hidden}[_moe].pth`.

Order: an explicit path > $CKPTFLOW_PRETRAINED_PATH (then $MINILLM_PRETRAINED_PATH) > the
remote directory > the local directory (./out). Any fsspec URL works. An explicit path that
does not exist is an error (the user asked for that file); an environment variable naming a
missing path falls through like the directories, since environments go stale. When nothing
is found the error lists every candidate searched, in order.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from ckpt_core.errors import StorageRefusedError, UsageError
from ckpt_core.io.storage import Location, join_url

__all__ = [
    "ENV_VARS",
    "KNOWN_STAGES",
    "Resolution",
    "pretrained_name",
    "resolve",
]

ENV_VARS = ("CKPTFLOW_PRETRAINED_PATH", "MINILLM_PRETRAINED_PATH")
KNOWN_STAGES = (
    "pretrain",
    "full_sft",
    "reason",
    "rlhf",
    "dpo",
    "ppo_actor",
    "ppo_critic",
    "grpo",
    "spo",
    "full_dist",
    "lora",
)
_STAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Resolution:
    url: str
    source: str  # explicit | env:NAME | remote | local
    searched: list[tuple[str, str]] = field(default_factory=list)  # (source, url), in order

    def as_dict(self) -> dict[str, object]:
        return {
            "url": self.url,
            "source": self.source,
            "searched": [{"source": s, "url": u} for s, u in self.searched],
        }


def pretrained_name(stage: str, hidden_size: int, *, moe: bool = False) -> str:
    if not _STAGE.match(stage):
        raise UsageError(
            f"stage {stage!r} is not a plain name (known stages: {', '.join(KNOWN_STAGES)})"
        )
    if int(hidden_size) <= 0:
        raise UsageError(f"hidden size must be a positive integer, got {hidden_size}")
    return f"{stage}_{int(hidden_size)}{'_moe' if moe else ''}.pth"


def resolve(
    stage: str,
    hidden_size: int,
    *,
    moe: bool = False,
    remote_dir: str | None = None,
    local_dir: str | None = "./out",
    explicit: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Resolution:
    """The first existing candidate, with the list of what was searched (for the CLI's report)."""
    env = os.environ if env is None else env
    name = pretrained_name(stage, hidden_size, moe=moe)
    if explicit:
        if not Location(explicit).exists():
            raise StorageRefusedError(
                f"{explicit}: the pretrained path given explicitly does not exist "
                "(no fallback is tried when a path is given)"
            )
        return Resolution(explicit, "explicit", [("explicit", explicit)])
    candidates: list[tuple[str, str]] = []
    for var in ENV_VARS:
        value = env.get(var)
        if value:
            # A directory means "look for the standard name in it"; anything else is the file.
            loc = Location(value)
            candidates.append((f"env:{var}", join_url(value, name) if loc.isdir() else value))
    if remote_dir:
        candidates.append(("remote", join_url(remote_dir, name)))
    if local_dir:
        candidates.append(("local", join_url(local_dir, name)))
    searched: list[tuple[str, str]] = []
    for source, url in candidates:
        searched.append((source, url))
        if Location(url).exists():
            return Resolution(url, source, searched)
    listing = "; ".join(f"{s}: {u}" for s, u in searched) or "(no candidate: give a path)"
    raise StorageRefusedError(
        f"no pretrained weights {name} found; searched {listing}. Pass --path, set "
        f"{ENV_VARS[0]}, or give --remote-dir/--local-dir"
    )
