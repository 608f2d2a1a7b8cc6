"""`ckptflow demo`: a tiny model, converted by the `convert` Prefect flow on Prefect's embedded
server, verified, and loaded with transformers. No network, no GPU."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def prepare_env(workdir: str) -> None:
    """Before prefect is imported: a project-local Prefect home, analytics off (no network)."""
    home = Path(workdir).resolve() / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(home))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def run(workdir: str) -> int:
    prepare_env(workdir)
    import torch
    from transformers import AutoModelForCausalLM

    from ckptflow.tiny import build_tiny_qwen2, sample_input_ids
    from flows.convert import convert_flow

    root = Path(workdir).resolve()
    source, output = root / "source-fp32", root / "converted-bf16"
    model = build_tiny_qwen2(seed=0)
    if not (source / "model.safetensors.index.json").exists():
        model.save_pretrained(source, max_shard_size="200KB")
        print(
            f"built a tiny Qwen2 ({sum(p.numel() for p in model.parameters())} params) at {source}"
        )
    print("running the `convert` flow on Prefect's embedded server (first start takes ~15 s)...")
    outcome = convert_flow(str(source), str(output), dtype="bf16", max_shard_size="200KB")
    pair: Any = AutoModelForCausalLM.from_pretrained(
        output, dtype=torch.bfloat16, output_loading_info=True
    )
    loaded, info = pair
    problems = {k: v for k, v in info.items() if v}
    # The reference: the source weights loaded the same way (transformers casts them to bf16).
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    ids = sample_input_ids()
    with torch.no_grad():
        expected = reference(ids).logits
        got = loaded(ids).logits
    same = torch.equal(expected, got)
    print(f"\nconverted model: {output}")
    print(f"flow result: {outcome}")
    print(f"from_pretrained: {problems or 'no missing or unexpected keys'}")
    print(f"logits identical to the source loaded as bf16: {same}")
    print(f"Prefect home (runs, artifacts): {os.environ['PREFECT_HOME']}")
    return 0 if same and not problems else 1
