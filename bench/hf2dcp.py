"""Benchmark: a ~1 GB HF model directory into a torch Distributed Checkpoint (what FSDP training
starts from), ckptflow vs the reference tools.

    .venv/bin/python bench/hf2dcp.py [--repeat 3]   # generate (cached under bench/out/) and compare

(a) ckptflow: `convert(src, dst, to="dcp", dcp_key="model")`: DCP's own planner and writer,
    each tensor read and serialised in turn, then every tensor re-read and compared, manifest;
(b) `torch.distributed.checkpoint.format_utils.torch_save_to_dcp` from a torch.save of the
    model's state dict (`{"model": sd}`, written beforehand, untimed);
(c) load everything, then save: `safetensors.torch.load_file` of the model, `dcp.save`.
All three write `{"model": state_dict}` in fp32 (the stored dtype) into one process's DCP files.
Each variant runs in its own subprocess, interleaved, and reports its wall time, its peak RSS
(ru_maxrss) and its RSS right after its imports (the baseline).
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
import warnings
from pathlib import Path

from _measure import Figure, input_key, ratios, rss_bytes, settle, table

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
sys.path.insert(0, str(HERE))
from dcp import CONFIG  # noqa: E402  (the same ~1 GB Qwen2 shape as bench/dcp.py)


def generate(root: Path) -> None:
    """The HF directory (save_pretrained, fp32) and a torch.save of its state dict."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**CONFIG))
    model.save_pretrained(root / "hf")
    torch.save({"model": model.state_dict()}, root / "full.pt")


def inputs() -> Path:
    key = input_key(CONFIG, generate)
    root = OUT / f"hf2dcp-{key}"
    if (root / "_DONE").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    subprocess.run([sys.executable, __file__, "generate", str(root)], check=True, cwd=REPO)
    (root / "_DONE").write_text("ok\n")
    return root


def variant(name: str, root: str, dst: str) -> None:
    """One measured run in this (fresh) process; prints a JSON line."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import torch_save_to_dcp
    from torch.distributed.checkpoint.state_dict_saver import save

    from ckpt_core.pipeline.conversion import options_from
    from ckpt_core.pipeline.convert import convert

    warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
    baseline = rss_bytes()
    start = time.perf_counter()
    if name == "ckptflow":
        convert(f"{root}/hf", dst, options_from(to="dcp", dcp_key="model"))
    elif name == "torch_save_to_dcp":
        torch_save_to_dcp(f"{root}/full.pt", dst)
    else:
        save({"model": load_file(f"{root}/hf/model.safetensors")}, checkpoint_id=dst, no_dist=True)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"variant": name, "wall_s": wall, "peak_rss": peak, "baseline_rss": baseline}))


def _same_tensors(a: str, b: str) -> bool:
    """Outside the timing: both outputs hold the same names and bytes (ckptflow's DCP reader)."""
    from ckpt_core.formats.registry import open_reader
    from ckpt_core.pipeline.verify import identical

    x, y = open_reader(a), open_reader(b)
    return set(x.index()) == set(y.index()) and all(
        identical(x.read(n), y.read(n)) for n in x.index()
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    root = inputs()
    size = (root / "hf" / "model.safetensors").stat().st_size
    print(f"source: {root / 'hf'}  {size / 1e9:.2f} GB fp32 safetensors")
    names = ("ckptflow", "torch_save_to_dcp", "load_file + dcp.save")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for repeat in range(args.repeat):
        for name in names:  # interleaved, so that none always runs on a warmer cache
            dst = OUT / f"hf2dcp-run-{names.index(name)}"
            shutil.rmtree(dst, ignore_errors=True)
            settle()
            done = subprocess.run(
                [sys.executable, __file__, "variant", name, str(root), str(dst)],
                check=True,
                env=env,
                cwd=REPO,
                capture_output=True,
                text=True,
            )
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
        if repeat == 0:  # the three outputs hold the same tensors
            sys.path.insert(0, str(REPO))
            first = str(OUT / "hf2dcp-run-0")
            for other in (1, 2):
                assert _same_tensors(first, str(OUT / f"hf2dcp-run-{other}")), other
            print("outputs: the same names and bytes in all three")
    for number in range(len(names)):
        shutil.rmtree(OUT / f"hf2dcp-run-{number}", ignore_errors=True)
    figures = {n: [Figure.of(n, r) for r in runs] for n, runs in results.items()}
    print(table(figures, size / 1e6))
    for theirs in names[1:]:
        print(ratios("ckptflow", theirs, figures, targets=False))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "generate":
        generate(Path(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "variant":
        sys.path.insert(0, str(REPO))
        variant(*sys.argv[2:5])
    else:
        main()
