"""Benchmark: a LoRA fused into a ~1 GB fp32 base, ckptflow vs PEFT's merge_and_unload.

    .venv/bin/python bench/lora.py [--repeat 3]   # generate (cached under bench/out/) and compare

(a) ckptflow: `convert(adapter, dst, dtype="fp32", base=base)` (fuses module by module while
    streaming the base by byte range, writes, verifies, publishes);
(b) reference: `from_pretrained(base)`, `PeftModel.from_pretrained`, `merge_and_unload()`,
    `save_pretrained(dst)`.
Each variant runs in its own subprocess and reports its wall time and peak RSS, and the
interpreter's RSS right after its imports (the baseline). Both outputs are the same bytes'
worth of tensors; the test suite checks they are equal bit for bit.
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
from dcp import CONFIG  # the same Qwen2 shape, ~251M parameters

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"

# LoRA r=16 on the attention and MLP projections of bench/dcp.py's Qwen2 (1.0 GB in fp32),
# lm_head saved whole.
LORA = dict(
    r=16,
    lora_alpha=32,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    modules_to_save=["lm_head"],
)


def generate(root: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**CONFIG))
    model.save_pretrained(root / "base")
    peft = get_peft_model(model, LoraConfig(**LORA))  # type: ignore[arg-type]
    with torch.no_grad():
        for param in peft.parameters():
            if param.requires_grad:  # B is zero at init: give the adapter something to add
                param.copy_(torch.randn_like(param) * 0.02)
    peft.save_pretrained(root / "adapter")


def inputs() -> Path:
    key = input_key([CONFIG, LORA], generate)
    root = OUT / f"lora-{key}"
    if (root / "_DONE").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    # In a child: a peak RSS high-water mark survives fork + exec into the measured runs.
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, __file__, "generate", str(root)], check=True, env=env)
    (root / "_DONE").write_text("ok\n")
    return root


def variant(name: str, adapter: str, dst: str, base: str) -> None:
    """One measured run in this (fresh) process; prints a JSON line."""
    import torch

    if name == "ckptflow":
        from ckpt_core.pipeline.convert import ConvertOptions, convert
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    baseline = rss_bytes()
    start = time.perf_counter()
    if name == "ckptflow":
        convert(adapter, dst, ConvertOptions(dtype="fp32", base=base))
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        merged.save_pretrained(dst)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"variant": name, "wall_s": wall, "peak_rss": peak, "baseline_rss": baseline}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    root = inputs()
    size = (root / "base" / "model.safetensors").stat().st_size
    print(
        f"base: {size / 1e9:.2f} GB fp32; adapter: r={LORA['r']} on {len(LORA['target_modules'])} projections + lm_head"
    )
    names = ("ckptflow", "merge_and_unload")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for _ in range(args.repeat):
        for name in names:  # interleaved, so that neither always runs on a warmer cache
            dst = OUT / f"run-lora-{name}"
            shutil.rmtree(dst, ignore_errors=True)
            settle()
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "variant",
                    name,
                    str(root / "adapter"),
                    str(dst),
                    str(root / "base"),
                ],
                check=True,
                env=dict(os.environ, PYTHONPATH=str(REPO)),
                cwd=REPO,
                capture_output=True,
                text=True,
            )
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            shutil.rmtree(dst, ignore_errors=True)
    figures = {n: [Figure.of(n, r) for r in runs] for n, runs in results.items()}
    print(table(figures, size / 1e6))
    print(ratios("ckptflow", "merge_and_unload", figures))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "generate":
        generate(Path(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "variant":
        sys.path.insert(0, str(REPO))
        variant(*sys.argv[2:6])
    else:
        main()
