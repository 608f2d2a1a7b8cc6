"""ZeRO-3 -> fp32 safetensors: ckptflow against DeepSpeed's zero_to_fp32, on a ~1 GB checkpoint.

    .venv/bin/python bench/zero3.py [--layers 16] [--repeat 1] [--steps 0] [--cold] [--commands]

Generates (once, cached under bench/out/) a real ZeRO-3 checkpoint of a ~250M-parameter
Qwen2 with DeepSpeed under torchrun (2 ranks, gloo, CPU; by default 0 training steps, so the
optimizer files hold just the fp32 master partitions: ~1 GB; `--steps 1 --layers 4` gives a
~1 GB checkpoint from a real step, whose optimizer files also hold Adam's moments), then times each variant in its own
subprocess and reports its wall time and peak RSS (VmHWM) next to the interpreter's RSS
right after its imports:

  ckptflow    ckpt_core.pipeline.convert.convert(..., ConvertOptions(dtype="fp32")): detect, stream
              every tensor into fp32 safetensors, re-read and verify, publish
  zero_to_fp32  deepspeed's convert_zero_checkpoint_to_fp32_state_dict(safe_serialization=True)
  ckptflow-read  for reference: the DeepSpeed reader alone, every tensor read and dropped

With --commands, the whole commands a user runs instead, timed from start to exit (their
imports included; the peak RSS is the process's own):

  ckptflow      ckptflow convert CKPT OUT --dtype fp32 --base BASE
  zero_to_fp32  python CKPT/zero_to_fp32.py CKPT OUT --safe_serialization (the script
                DeepSpeed writes beside every checkpoint)

Target (issue 3): ckptflow peak RSS <= 1/8 of zero_to_fp32's, wall time <= 1/2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _measure import Figure, ratios, settle, table  # noqa: E402

from tests.fixtures.deepspeed_cache import GENERATOR, script_hash, torchrun  # noqa: E402

OUT = REPO / "bench" / "out"


def model_config(layers: int) -> dict[str, int]:
    return dict(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )


def build_checkpoint(layers: int, steps: int) -> Path:
    config = json.dumps(model_config(layers), sort_keys=True)
    key = f"{script_hash(GENERATOR)}-{hashlib.sha256(config.encode()).hexdigest()[:8]}"
    key += f"-steps{steps}" if steps else ""
    target = OUT / f"zero3-{key}"
    if (target / "_DONE").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    started = time.perf_counter()
    args = [str(target), "stage3", "--config", config, "--steps", str(steps)]
    torchrun(2, args, target / "gen.log", timeout=3600)
    print(f"generated {target} in {time.perf_counter() - started:.0f} s", flush=True)
    return target


CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, {repo!r})

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0

variant, src, dst, base = sys.argv[1:5]
if variant.startswith("ckptflow"):
    import torch
    from ckpt_core.pipeline.convert import ConvertOptions, convert
    from ckpt_core.formats.registry import formats, open_reader
    formats()  # import the format modules now, so they count in the baseline
else:
    import torch
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict
baseline = status("VmRSS")
started = time.perf_counter()
if variant == "ckptflow":
    convert(src, dst, ConvertOptions(dtype="fp32", base=base, overwrite=True))
elif variant == "ckptflow-read":  # the reader alone: every tensor materialised, then dropped
    reader = open_reader(src)
    for name in reader.index():
        reader.read(name)
else:
    convert_zero_checkpoint_to_fp32_state_dict(src, dst, safe_serialization=True)
wall = time.perf_counter() - started
peak = status("VmHWM")
print(json.dumps({{"variant": variant, "wall_s": wall, "peak_rss": peak, "baseline_rss": baseline,
                   "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""


def drop_page_cache() -> bool:
    """Cold start: the checkpoint comes from the disk, as a 70B one (larger than RAM) always
    does. Needs root; returns False where the kernel refuses."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def command(variant: str, src: Path, dst: Path, base: Path) -> list[str]:
    if variant == "ckptflow":
        cli = ["-m", "ckptflow.cli", "convert", str(src), str(dst), "--dtype", "fp32"]
        return [sys.executable, *cli, "--base", str(base)]
    return [
        sys.executable,
        str(src / "zero_to_fp32.py"),
        str(src),
        str(dst),
        "--safe_serialization",
    ]


def run_command(variant: str, src: Path, dst: Path, base: Path) -> dict[str, float]:
    """One whole command, start to exit; its own peak RSS from wait4."""
    started = time.perf_counter()
    child = subprocess.Popen(
        command(variant, src, dst, base),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert child.stderr is not None
    errors = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    if status:
        raise SystemExit(f"{variant} failed:\n{errors.decode()[-4000:]}")
    return {"variant": variant, "wall_s": wall, "peak_rss": usage.ru_maxrss * 1024,
            "baseline_rss": 0}  # fmt: skip


def run_variant(
    variant: str, src: Path, dst: Path, base: Path, cold: bool = False, commands: bool = False
) -> dict[str, float]:
    shutil.rmtree(dst, ignore_errors=True)
    settle()
    if cold and not drop_page_cache():
        raise SystemExit("--cold needs root to write /proc/sys/vm/drop_caches")
    if commands:
        return run_command(variant, src, dst, base)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD.format(repo=str(REPO)),
            variant,
            str(src),
            str(dst),
            str(base),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if done.returncode:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-4000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    result["output_bytes"] = (
        sum(f.stat().st_size for f in dst.rglob("*.safetensors")) if dst.exists() else 0
    )
    return result


def check_same(a: Path, b: Path) -> int:
    """Both outputs hold the same tensors, bit for bit (one tensor at a time)."""
    import torch
    from safetensors import safe_open

    def tensors(root: Path) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for path in root.glob("*.safetensors"):
            with safe_open(str(path), "pt") as handle:
                found.update({name: path for name in handle.keys()})  # noqa: SIM118
        return found

    left, right = tensors(a), tensors(b)
    assert set(left) == set(right), set(left) ^ set(right)
    for name in left:
        with safe_open(str(left[name]), "pt") as x, safe_open(str(right[name]), "pt") as y:
            assert torch.equal(x.get_tensor(name), y.get_tensor(name)), name
    return len(left)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--steps",
        type=int,
        default=0,
        help="training steps before the save: 0 leaves only fp32 masters in the optimizer "
        "files; 1+ adds Adam's two moments, as in a checkpoint from a real run",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="drop the page cache before each variant (root): reads come from the disk",
    )
    parser.add_argument(
        "--commands",
        action="store_true",
        help="time the whole commands (imports included) instead of the library calls",
    )
    args = parser.parse_args()

    root = build_checkpoint(args.layers, args.steps)
    src, base = root / "stage3" / "ckpt", root / "stage3" / "base"
    size = sum(f.stat().st_size for f in src.rglob("*.pt"))
    print(f"checkpoint: {src} ({size / 1e9:.2f} GB of .pt files)")
    variants = ["ckptflow", "zero_to_fp32"] + ([] if args.commands else ["ckptflow-read"])
    results: dict[str, list[dict[str, float]]] = {variant: [] for variant in variants}
    for _ in range(args.repeat):
        for variant in results:  # alternate, so neither always runs on a warmer page cache
            results[variant].append(
                run_variant(variant, src, OUT / f"out-{variant}", base, args.cold, args.commands)
            )
    count = check_same(OUT / "out-ckptflow", OUT / "out-zero_to_fp32")
    print(f"outputs agree bit for bit on {count} tensors")
    figures = {v: [Figure.of(v, r) for r in runs] for v, runs in results.items()}
    print(table(figures, size / 1e6))
    print(ratios("ckptflow", "zero_to_fp32", figures))
    (OUT / "zero3-results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
