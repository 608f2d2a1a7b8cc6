"""Split an HF VLM checkpoint into its parts (vision tower, language model) for training.

Output (the layout the training scripts load): `vision_model.pt` and `text_model.pt`, each
`{"model": state_dict, "config": that part's config}` keyed by the part's own names (the
HF names without the part prefix; the untied `lm_head.weight` goes with the text part),
plus the model's `config.json` and `split_metadata.json` (source, layout read, tensor
counts, sha256 per file, versions). `split_metadata.json` is written last: its presence
means the split is complete, and a rerun on the same source finds it and skips.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch

import ckpt_core
from ckpt_core.errors import PublishError
from ckpt_core.families import family_for, load_config
from ckpt_core.families.hf_layout import head_is_tied, head_to_drop
from ckpt_core.families.model_config import TIED_HEAD
from ckpt_core.formats.registry import open_reader
from ckpt_core.io.storage import Location
from ckpt_core.pipeline.publish import refuse_inside
from ckpt_core.pipeline.writer import hash_file

__all__ = ["SPLIT_METADATA", "SplitResult", "split"]

SPLIT_METADATA = "split_metadata.json"


@dataclass
class SplitResult:
    output_url: str
    layout: str
    counts: dict[str, int]
    files: dict[str, str] = field(default_factory=dict)  # file -> sha256
    skipped: bool = False


def _source_fingerprint(root: Location, files: list[str]) -> dict[str, int]:
    return {f: root.size(f) for f in sorted([*files, "config.json"])}


def _existing(out: Location, fingerprint: dict[str, int], source: str, overwrite: bool) -> Any:
    """The previous split's metadata if it is this source's and intact; refuse a different one."""
    if not out.exists(SPLIT_METADATA):
        return None
    meta = json.loads(out.read_text(SPLIT_METADATA))
    same = meta.get("source_files") == fingerprint and meta.get("source") == source
    if same and all(
        out.exists(f) and hash_file(out, f).sha256 == info["sha256"]
        for f, info in meta["files"].items()
    ):
        return meta
    if not overwrite:
        raise PublishError(
            f"{out.path}: holds a split of {meta.get('source')!r} that differs from this one "
            "(another source, or files changed): choose another --output-dir or pass --overwrite"
        )
    return None


def split(model_url: str, output_url: str, *, overwrite: bool = False) -> SplitResult:
    """Split the HF model at `model_url` into per-part files under `output_url`."""
    import transformers

    root, out = Location(model_url), Location(output_url)
    refuse_inside(out, root, "source model")  # symlinks resolved: the source is never written
    config = load_config(root)
    family = family_for(config, root.file("config.json"))
    reader = open_reader(model_url, format_name="hf")
    names = list(reader.index())
    layout = family.detect_layout(names, model_url)
    tied = head_is_tied(config, root.file("config.json"))
    head = head_to_drop(
        names, tied=tied, where=model_url, head=family.to_hf("text", TIED_HEAD, layout)
    )
    fingerprint = _source_fingerprint(root, reader.facts().files)

    previous = _existing(out, fingerprint, model_url, overwrite)
    if previous is not None:
        return SplitResult(
            output_url,
            previous["layout_read"],
            {name: v["tensors"] for name, v in previous["parts"].items()},
            {f: v["sha256"] for f, v in previous["files"].items()},
            skipped=True,
        )

    # part -> local name -> HF name, in checkpoint order; every name must have a TP role
    # now, so a split that could never be merged back fails here and not after training.
    parts: dict[str, dict[str, str]] = {p.name: {} for p in family.parts}
    notes: list[str] = []
    for name in names:
        if name == head:
            notes.append("lm_head.weight left out: the config ties it to embed_tokens")
            continue
        part_name, local = family.to_part(name, layout)
        family.roles[part_name].role_of(local)
        parts[part_name][local] = name

    out.fs.makedirs(out.path, exist_ok=True)
    if out.exists(SPLIT_METADATA):
        out.fs.rm(out.file(SPLIT_METADATA))  # --overwrite: the old split is incomplete from now on
    files: dict[str, dict[str, Any]] = {}
    for part in family.parts:
        # One part in memory at a time: the training scripts load this file whole anyway.
        state = {local: reader.read(hf) for local, hf in parts[part.name].items()}
        part_config = json.loads(json.dumps(family.part_config(config, part.name), default=str))
        with out.fs.open(out.file(part.split_file), "wb") as handle:
            torch.save({"model": state, "config": part_config}, handle)
        del state
        files[part.split_file] = {
            "sha256": hash_file(out, part.split_file).sha256,
            "bytes": out.size(part.split_file),
        }
    config_bytes = root.read_bytes("config.json")
    with out.fs.open(out.file("config.json"), "wb") as handle:
        handle.write(config_bytes)
    files["config.json"] = {
        "sha256": hashlib.sha256(config_bytes).hexdigest(),
        "bytes": len(config_bytes),
    }

    counts = {p: len(v) for p, v in parts.items()}
    metadata = {
        "source": model_url,
        "source_files": fingerprint,
        "model_type": family.model_type,
        "layout_read": layout,
        "prefixes_read": {p.part: p.hf for p in family.layouts[layout] if p.local == ""},
        "tie_word_embeddings": tied,
        "parts": {p.name: {"file": p.split_file, "tensors": counts[p.name]} for p in family.parts},
        "files": files,
        "notes": notes,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "ckptflow_version": ckpt_core.__version__,
    }
    with out.fs.open(out.file(SPLIT_METADATA), "w") as handle:
        handle.write(json.dumps(metadata, indent=2) + "\n")
    return SplitResult(output_url, layout, counts, {f: v["sha256"] for f, v in files.items()})
