"""A tiny built-in trainer for tests and the demo: split files in, TP rank files out.

It shards each part across N ranks by the family's role table, then runs `steps` real
optimisation steps: the full model is assembled from the rank pieces, one forward/backward
on a synthetic image+text batch gives every parameter's gradient, and each rank's own Adam
updates its local shard with its slice of that gradient (exactly the gradient a
tensor-parallel run computes for that shard). Replicated tensors get the same update on
every rank, so they stay equal, as the merge checks. `steps=0` only shards.

Output (an EPOCH_DIR): `vision/rank_K.pt`, `text/rank_K.pt` = `{"model": local shards}`
and `metadata.json` (parallel size, steps, losses), written last.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ckpt_core.errors import FormatError, TrainCommandError
from ckpt_core.families import Family, family_for, load_config
from ckpt_core.families.tp_roles import merge, shard
from ckpt_core.formats.torchzip import LazyTorchFile, iter_tensors
from ckpt_core.io.storage import Location
from ckpt_core.vlm.split import SPLIT_METADATA

__all__ = ["METADATA", "OnStep", "TrainResult", "load_split", "run_train_command", "train"]

METADATA = "metadata.json"
# Called after each optimisation step with (step, steps, loss), step counting from 1.
OnStep = Callable[[int, int, float], None]


@dataclass
class TrainResult:
    output_url: str
    parallel_size: int
    steps: int
    losses: list[float] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def load_split(split_url: str) -> tuple[dict[str, Any], Family, dict[str, dict[str, torch.Tensor]]]:
    """config, family and {part: {local name: tensor}} of a split directory."""
    root = Location(split_url)
    if not root.exists(SPLIT_METADATA):
        raise FormatError(f"{root.path}: no {SPLIT_METADATA}: not a (complete) split directory")
    config = load_config(root)
    family = family_for(config, root.file("config.json"))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for part in family.parts:
        obj = LazyTorchFile(root, part.split_file).obj
        if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
            raise FormatError(f"{root.file(part.split_file)}: expected {{'model': state_dict}}")
        parts[part.name] = {n: t.materialize() for n, t in iter_tensors(obj["model"])}
    return config, family, parts


def _build_model(family: Family, config: dict[str, Any]) -> Any:
    import transformers

    model_class = getattr(transformers, family.model_class)
    torch.manual_seed(0)
    return model_class(family.parsed_config(config)).train()


def train(
    split_url: str,
    output_url: str,
    parallel_size: int,
    *,
    steps: int = 2,
    lr: float = 1e-3,
    seed: int = 0,
    on_step: OnStep | None = None,
) -> TrainResult:
    if parallel_size < 1:
        raise FormatError(f"parallel size must be >= 1, got {parallel_size}")
    config, family, parts = load_split(split_url)
    vocab = family.vocab_size(config)
    size = parallel_size
    # rank r of part p: {local name: leaf tensor}
    ranks: dict[str, list[dict[str, torch.Tensor]]] = {
        p: [
            {n: shard(f"{p} {n}", t, family.roles[p].role_of(n), r, size) for n, t in sd.items()}
            for r in range(size)
        ]
        for p, sd in parts.items()
    }
    losses: list[float] = []
    if steps:
        losses = _optimise(family, config, ranks, vocab, size, steps, lr, seed, on_step)

    out = Location(output_url)
    files: list[str] = []
    for part, shards in ranks.items():
        out.fs.makedirs(out.file(part), exist_ok=True)
        for rank, state in enumerate(shards):
            relative = f"{part}/rank_{rank}.pt"
            with out.fs.open(out.file(relative), "wb") as handle:
                torch.save({"model": {n: t.detach() for n, t in state.items()}}, handle)
            files.append(relative)
    metadata = {
        "parallel_size": size,
        **{p: {"parallel_size": size, "strategy": "tensor"} for p in ranks},
        "model_type": family.model_type,
        "steps": steps,
        "losses": losses,
        "source": split_url,
        "trainer": "ckptflow tiny_trainer",
    }
    with out.fs.open(out.file(METADATA), "w") as handle:
        handle.write(json.dumps(metadata, indent=2) + "\n")
    return TrainResult(output_url, size, steps, losses, files)


def _optimise(
    family: Family,
    config: dict[str, Any],
    ranks: dict[str, list[dict[str, torch.Tensor]]],
    vocab: int,
    size: int,
    steps: int,
    lr: float,
    seed: int,
    on_step: OnStep | None = None,
) -> list[float]:
    model = _build_model(family, config)
    params = dict(model.named_parameters())  # tied weights appear once
    layout = family.detect_layout(list(params), f"in-memory {family.model_class}")
    hf_names = {
        (p, n): family.to_hf(p, n, layout) for p, shards in ranks.items() for n in shards[0]
    }
    if set(hf_names.values()) != set(params):
        raise FormatError(
            f"split tensors do not match {family.model_class}'s parameters: "
            f"{sorted(set(params) ^ set(hf_names.values()))[:10]}"
        )
    optimisers = []
    for shards in ranks.values():
        for state in shards:
            for tensor in state.values():
                tensor.requires_grad_(True)
            optimisers.append((state, torch.optim.Adam(list(state.values()), lr=lr)))
    losses = []
    for step in range(steps):
        with torch.no_grad():
            for (part, name), hf in hf_names.items():
                role = family.roles[part].role_of(name)
                pieces = [s[name].detach() for s in ranks[part]]
                params[hf].copy_(merge(f"{part} {name}", role, pieces, vocab))
        model.zero_grad()
        loss = model(**family.demo_batch(model.config, seed + step)).loss
        loss.backward()
        losses.append(float(loss.detach()))
        for (part, name), hf in hf_names.items():
            role = family.roles[part].role_of(name)
            grad = params[hf].grad
            full = torch.zeros_like(params[hf]) if grad is None else grad
            for rank, state in enumerate(ranks[part]):
                state[name].grad = shard(f"{part} {name}", full, role, rank, size)
        for _, optimiser in optimisers:
            optimiser.step()
            optimiser.zero_grad()
        if on_step:
            on_step(step + 1, steps, losses[-1])
    return losses


def run_train_command(
    command: str,
    split_url: str,
    output_url: str,
    parallel_size: int,
    timeout_s: float | None = None,
) -> TrainResult:
    """Run the user's training command on the split; it must write rank files + metadata.json.

    `{split_dir}`, `{output_dir}` and `{parallel_size}` in the command are replaced; without
    placeholders, `--split-dir DIR --output-dir DIR` are appended. The same values are in the
    environment as CKPTFLOW_SPLIT_DIR, CKPTFLOW_OUTPUT_DIR and CKPTFLOW_PARALLEL_SIZE.
    """
    values = {"split_dir": split_url, "output_dir": output_url, "parallel_size": str(parallel_size)}
    argv = shlex.split(command)
    if any("{" + key + "}" in command for key in values):
        argv = [arg.format(**values) for arg in argv]
    else:
        argv += ["--split-dir", split_url, "--output-dir", output_url]
    env = dict(os.environ)
    env.update(
        CKPTFLOW_SPLIT_DIR=split_url,
        CKPTFLOW_OUTPUT_DIR=output_url,
        CKPTFLOW_PARALLEL_SIZE=str(parallel_size),
    )
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError as e:
        raise TrainCommandError(f"train command not found: {argv[0]!r} ({command!r})") from e
    except subprocess.TimeoutExpired as e:
        raise TrainCommandError(f"train command timed out after {timeout_s} s: {command!r}") from e
    if done.returncode != 0:
        # One line (the CLI prints errors as one): the output's last lines, joined.
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise TrainCommandError(
            f"train command exited with code {done.returncode}: {shlex.join(argv)}"
            + (f"; its last output: {tail}" if tail else "")
        )
    out = Location(output_url)
    if not out.exists(METADATA):
        raise TrainCommandError(
            f"train command succeeded but wrote no {METADATA} to {out.path}: "
            "it must save rank files and metadata.json there"
        )
    meta = json.loads(out.read_text(METADATA))
    return TrainResult(
        output_url,
        int(meta.get("parallel_size", parallel_size)),
        int(meta.get("steps", 0)),
        [float(x) for x in meta.get("losses", [])],
    )
