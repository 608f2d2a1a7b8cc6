"""Benchmark: a ~1 GB HF checkpoint converted by ckptflow, by the obvious baseline (load it all
with safetensors, cast, save_file), and a plain copy of the same bytes (the I/O floor).

    .venv/bin/python bench/convert.py [--gb 1.0] [--out bench/out] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import Figure, measure, table  # noqa: E402


def make_checkpoint(path: Path, total_gb: float) -> int:
    """fp32 shards of 2 GB at most, tensors of ~32 MB, like a mid-size model's layers."""
    if (path / "model.safetensors.index.json").exists():
        return sum(p.stat().st_size for p in path.glob("*.safetensors"))
    path.mkdir(parents=True, exist_ok=True)
    tensor_elems = 8 * 1024 * 1024  # 32 MB in fp32
    count = max(1, int(total_gb * 1e9 / (tensor_elems * 4)))
    per_shard = 16
    weight_map: dict[str, str] = {}
    shards = (count + per_shard - 1) // per_shard
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {
            f"model.layers.{i}.mlp.weight": torch.randn(2048, 4096)
            for i in range(s * per_shard, min(count, (s + 1) * per_shard))
        }
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    import json

    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": count * tensor_elems * 4}, "weight_map": weight_map})
    )
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    src = out / "hf-src"
    size = make_checkpoint(src, args.gb)
    data_mb = size / 1e6
    print(f"source: {src} ({data_mb:.0f} MB fp32, {os.cpu_count()} cores)\n")
    variants = {
        "plain copy (I/O floor)": (
            "copy",
            "import shutil, pathlib",
            f"""
            dst = pathlib.Path({str(out / "copy")!r}); dst.mkdir()
            for p in pathlib.Path({str(src)!r}).glob('*.safetensors'):
                shutil.copyfile(p, dst / p.name)
            """,
        ),
        "ckptflow convert --dtype bf16 (verified)": (
            "ckptflow-bf16",
            "from ckptflow.cli import main; import ckpt_core.pipeline.convert, transformers",
            f"main(['convert', {str(src)!r}, {str(out / 'ckptflow-bf16')!r}, '--dtype', 'bf16'])",
        ),
        "ckptflow convert --dtype fp32 (verified)": (
            "ckptflow-fp32",
            "from ckptflow.cli import main; import ckpt_core.pipeline.convert, transformers",
            f"main(['convert', {str(src)!r}, {str(out / 'ckptflow-fp32')!r}, '--dtype', 'fp32'])",
        ),
        "baseline: load_file all + cast + save_file": (
            "baseline-bf16",
            "import torch, pathlib; from safetensors.torch import load_file, save_file",
            f"""
            state = {{}}
            for p in sorted(pathlib.Path({str(src)!r}).glob('*.safetensors')):
                state.update({{k: v.to(torch.bfloat16) for k, v in load_file(p).items()}})
            pathlib.Path({str(out / "baseline-bf16")!r}).mkdir()
            save_file(state, {str(out / "baseline-bf16" / "model.safetensors")!r}, metadata={{'format': 'pt'}})
            """,
        ),
    }
    runs: dict[str, list[Figure]] = {name: [] for name in variants}
    for _ in range(args.repeat):
        for name, (folder, imports, body) in variants.items():  # interleaved
            shutil.rmtree(out / folder, ignore_errors=True)
            shutil.rmtree(out / f".{folder}.ckptflow-staging", ignore_errors=True)
            runs[name].append(measure(name, imports, body))
    print(table(runs, data_mb))
    print("\nMB/s is source MB over wall time; ckptflow's time includes re-reading and comparing")
    print("every tensor. RSS above base = peak resident set minus the interpreter after imports.")


if __name__ == "__main__":
    main()
