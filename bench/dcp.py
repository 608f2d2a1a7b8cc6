"""Benchmark: a ~1 GB real DCP checkpoint to fp32 safetensors, ckptflow vs the reference tools.

    .venv/bin/python bench/dcp.py [--repeat 3]   # generate (cached under bench/out/) and compare

(a) ckptflow: `ckpt_core.pipeline.convert.convert(src, dst, dtype="fp32")` (reads every tensor chunk by
    chunk, writes sharded safetensors, verifies, publishes);
(b) reference: `dcp_to_torch_save`, then `torch.load` of that file and `save_file`;
(c) for information, the DCP reader alone with a minimal streaming safetensors write (no
    verify, no manifest, one file): what the convert pipeline adds on top of reading.
Each variant runs in its own subprocess and reports its wall time and peak RSS
(ru_maxrss), and the interpreter's RSS right after its imports (the baseline).
The checkpoint is written by a real FSDP2 run (torchrun, 2 ranks, gloo) with dcp.save.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _measure import Figure, input_key, ratios, rss_bytes, settle, table

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"

# Qwen2 shape of ~251M parameters (1.0 GB in fp32). The vocabulary is small so that the
# largest tensor (11.5 MB: an MLP projection) is typical of the model rather than one
# outsized embedding; the figures below say what the largest tensor is.
CONFIG = dict(
    vocab_size=8192,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=20,
    num_attention_heads=16,
    num_key_value_heads=8,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def generate(out: str) -> None:
    """Under torchrun: FSDP2-shard the model over the ranks and dcp.save it."""
    import torch
    import torch.distributed as dist
    from torch.distributed import checkpoint as dcp
    from torch.distributed.fsdp import fully_shard
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**CONFIG))
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    dcp.save({"model": model.state_dict()}, checkpoint_id=out)
    dist.barrier()
    if dist.get_rank() == 0:
        model.config.save_pretrained(Path(out).parent / "base")
    dist.destroy_process_group()


def checkpoint() -> Path:
    key = input_key(CONFIG, generate)
    root = OUT / f"dcp-{key}"
    if (root / "_DONE").exists():
        return root
    sys.path.insert(0, str(REPO))
    from tests.fixtures.launch import torchrun_command

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    command, env = torchrun_command(Path(__file__), 2, "generate", str(root / "dcp"))
    subprocess.run(command, check=True, env=env, cwd=REPO)
    (root / "_DONE").write_text("ok\n")
    return root


def stream_to_safetensors(src: str, path: str) -> None:
    """Header first (from the index), then each tensor's bytes in order: one tensor in memory."""
    import struct

    import torch

    from ckpt_core.dtypes import to_safetensors
    from ckpt_core.formats.registry import open_reader

    reader = open_reader(src)
    index = reader.index()
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, info in index.items():
        size = info.numel * 4
        header[name] = {
            "dtype": to_safetensors(torch.float32),
            "shape": list(info.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        for name in index:
            handle.write(reader.read(name).to(torch.float32).contiguous().numpy().data)


def variant(name: str, src: str, dst: str, base: str) -> None:
    """One measured run in this (fresh) process; prints a JSON line."""
    import torch
    from safetensors.torch import save_file

    if name == "ckptflow":
        from ckpt_core.pipeline.convert import ConvertOptions, convert
    elif name == "reader":
        from ckpt_core.formats.registry import open_reader  # noqa: F401 (imported before the baseline)
    else:
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    baseline = rss_bytes()
    start = time.perf_counter()
    if name == "ckptflow":
        convert(src, dst, ConvertOptions(dtype="fp32", base=base))
    elif name == "reader":
        stream_to_safetensors(src, f"{dst}/model.safetensors")
    else:
        Path(dst).mkdir(parents=True, exist_ok=True)
        dcp_to_torch_save(src, f"{dst}/full.pt")
        state = torch.load(f"{dst}/full.pt", weights_only=True)["model"]
        save_file({k: v.contiguous() for k, v in state.items()}, f"{dst}/model.safetensors")
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"variant": name, "wall_s": wall, "peak_rss": peak, "baseline_rss": baseline}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    root = checkpoint()
    src = str(root / "dcp")
    size = sum(f.stat().st_size for f in (root / "dcp").iterdir())
    sys.path.insert(0, str(REPO))
    from ckpt_core.formats.registry import open_reader

    index = open_reader(src).index()
    largest = max(index.values(), key=lambda i: i.nbytes)
    print(
        f"checkpoint: {src}  {size / 1e9:.2f} GB on disk, {len(index)} tensors, "
        f"largest {largest.name} {largest.nbytes / 1e6:.1f} MB"
    )
    names = ("ckptflow", "reference", "reader")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for _ in range(args.repeat):
        for name in names:  # interleaved, so that none always runs on a warmer cache
            dst = OUT / f"run-{name}"
            shutil.rmtree(dst, ignore_errors=True)
            settle()
            env = dict(os.environ, PYTHONPATH=str(REPO))
            done = subprocess.run(
                [sys.executable, __file__, "variant", name, src, str(dst), str(root / "base")],
                check=True,
                env=env,
                cwd=REPO,
                capture_output=True,
                text=True,
            )
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            shutil.rmtree(dst, ignore_errors=True)
    figures = {n: [Figure.of(n, r) for r in runs] for n, runs in results.items()}
    print(table(figures, size / 1e6))
    for name in ("ckptflow", "reader"):
        print(ratios(name, "reference", figures))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "generate":
        generate(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "variant":
        sys.path.insert(0, str(REPO))
        variant(*sys.argv[2:6])
    else:
        main()
