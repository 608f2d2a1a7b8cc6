"""The layout is a rule, not a habit: imports in ckpt_core run one way, and no lower group
imports a higher one (statically or lazily inside a function)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "ckpt_core"
# Lowest first. The top-level modules (errors, dtypes, units) are the foundation of all.
GROUPS = ("", "io", "families", "formats", "pipeline", "vlm", "proof")


def _group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in GROUPS) else ""


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            # `from ckpt_core import x` / `from ckpt_core.io import retry` name modules too.
            found += [f"{node.module}.{a.name}" for a in node.names]
    return found


MODULES = sorted(ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way(path: Path) -> None:
    here = ".".join(("ckpt_core", *path.relative_to(ROOT).with_suffix("").parts))
    mine = GROUPS.index(_group(here))
    upward = [
        m
        for m in _imports(path)
        if m.startswith("ckpt_core.") and _group(m) in GROUPS and GROUPS.index(_group(m)) > mine
    ]
    assert not upward, f"{here} imports from a higher group: {upward}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_never_imports_prefect_or_a_trainer(path: Path) -> None:
    # DeepSpeed and megatron checkpoints are read without their frameworks.
    banned = ("prefect", "prefect_dask", "deepspeed", "megatron")
    assert not [m for m in _imports(path) if m.split(".")[0] in banned]


def test_every_group_is_a_folder_one_level_deep() -> None:
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(GROUPS) - {""}
    assert not [p for p in ROOT.glob("*/*/*.py")], "groups are one level deep"
