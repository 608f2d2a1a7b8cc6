"""Benchmark: a ~1 GB Megatron-core torch_dist checkpoint (TP=2) to HF safetensors on CPU.

    .venv/bin/python bench/megatron.py [--repeat 3]   # generate (cached under bench/out/), compare

(a) ckptflow: `convert(src, dst, dtype="fp32", base=HF_DIR)`: each HF tensor read by byte range
    from the TP chunks, written, verified, published;
(b) megatron: what the tools that run here do (Megatron-Bridge, verl's merger, without their GPU
    and NCCL): megatron-core's own `dist_checkpointing.load` into a TP=1 GPTModel on CPU (one
    gloo rank), its state dict mapped to HF names in memory, `save_pretrained(state_dict=...)`
    of an HF model built on the meta device (no second copy of the weights).
Each variant runs in a fresh subprocess, interleaved, and reports wall time, peak RSS (VmHWM)
and the RSS right after its imports (the interpreter's baseline; transformers in both). The two outputs
are compared tensor by tensor once. The checkpoint is written by megatron-core itself
(torchrun, 2 ranks, gloo) with the fixtures' generator (tests/fixtures/megatron_gen.py).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"

# A Llama shape of ~252M parameters (1.0 GB in fp32), bench/dcp.py's sizes, TP=2; the vocabulary
# is padded by Megatron (8192 rows) and trimmed to the HF config's 8000.
CASE: dict[str, Any] = dict(
    tp=2, pp=1, layout="megatron-lm", hf="llama", dtype="fp32", heads=16, groups=8,
    tied=False, bias=False, qk_norm=False,
    hidden=1024, ffn=2816, layers=20, head_dim=64, vocab=8000, padded=8192,
)  # fmt: skip


def generate(out: str) -> None:
    """Under torchrun: build the model TP=2 with megatron-core and save it as Megatron-LM does."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from tests.fixtures.megatron_gen import build, cpu_setup, hf_config, save

    dist.init_process_group("gloo")
    cpu_setup()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=CASE["tp"])
    save(build(CASE), CASE, Path(out))
    if dist.get_rank() == 0:
        (Path(out) / "base").mkdir(parents=True, exist_ok=True)
        (Path(out) / "base" / "config.json").write_text(json.dumps(hf_config(CASE), indent=2))
    dist.barrier()
    dist.destroy_process_group()


def checkpoint() -> Path:
    sys.path.insert(0, str(REPO))
    from tests.fixtures import megatron_gen
    from tests.fixtures.launch import torchrun_command

    code = inspect.getsource(generate) + inspect.getsource(megatron_gen)
    key = hashlib.sha256((json.dumps(CASE, sort_keys=True) + code).encode()).hexdigest()[:12]
    root = OUT / f"megatron-{key}"
    if (root / "_DONE").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    command, env = torchrun_command(Path(__file__), 2, "generate", str(root))
    subprocess.run(command, check=True, env=env, cwd=REPO)
    (root / "_DONE").write_text("ok\n")
    return root


def _rss_bytes(field: str = "VmRSS:") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


def to_hf(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """A TP=1 GPTModel's state dict (local spec: separate norms) under Llama names, in memory
    (views where it can)."""
    heads, groups = config["num_attention_heads"], config["num_key_value_heads"]
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    head_dim = hidden // heads
    per_group = heads // groups * head_dim
    out = {
        "model.embed_tokens.weight": state["embedding.word_embeddings.weight"][:vocab],
        "model.norm.weight": state["decoder.final_layernorm.weight"],
        "lm_head.weight": state["output_layer.weight"][:vocab],
    }
    for i in range(config["num_hidden_layers"]):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = state[src + "self_attention.linear_qkv.weight"].view(groups, -1, hidden)
        q, k, v = qkv.split([per_group, head_dim, head_dim], dim=1)
        gate, up = state[src + "mlp.linear_fc1.weight"].chunk(2)
        out |= {
            dst + "input_layernorm.weight": state[src + "input_layernorm.weight"],
            dst + "self_attn.q_proj.weight": q.reshape(-1, hidden),
            dst + "self_attn.k_proj.weight": k.reshape(-1, hidden),
            dst + "self_attn.v_proj.weight": v.reshape(-1, hidden),
            dst + "self_attn.o_proj.weight": state[src + "self_attention.linear_proj.weight"],
            dst + "post_attention_layernorm.weight": state[src + "pre_mlp_layernorm.weight"],
            dst + "mlp.gate_proj.weight": gate,
            dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": state[src + "mlp.linear_fc2.weight"],
        }
    return out


def variant(name: str, src: str, dst: str, base: str) -> None:
    """One measured run in this (fresh) process; prints a JSON line."""
    if name == "ckptflow":
        # The model check lays out the --base model with transformers, as the other variant
        # saves with it: transformers is imported before the baseline in both.
        from transformers import AutoModelForCausalLM  # noqa: F401

        from ckpt_core.pipeline.conversion import options_from
        from ckpt_core.pipeline.convert import convert
    else:
        import torch
        import torch.distributed as dist
        from megatron.core import dist_checkpointing, parallel_state
        from transformers import AutoConfig, AutoModelForCausalLM

        from tests.fixtures.launch import free_port
        from tests.fixtures.megatron_gen import ITERATION, AttnBackend, build, cpu_setup
    baseline = _rss_bytes()
    start = time.perf_counter()
    if name == "ckptflow":
        convert(src, dst, options_from(dtype="fp32", base=base))
    else:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
        )
        cpu_setup()
        parallel_state.initialize_model_parallel()
        model = build({**CASE, "tp": 1})
        # The common state pickles argparse/megatron classes: Megatron-LM allow-lists them too.
        with torch.serialization.safe_globals([argparse.Namespace, AttnBackend]):
            ckpt_dir = f"{src}/iter_{ITERATION:07d}"
            loaded = dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir)
        model.load_state_dict(loaded, strict=False)  # in place: the loaded tensors are its own
        del loaded
        config = json.loads(Path(base, "config.json").read_text())
        hf_state = to_hf(model.state_dict(), config)
        with torch.device("meta"):
            hf_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
        hf_model.save_pretrained(dst, state_dict=hf_state)
        dist.destroy_process_group()
    wall = time.perf_counter() - start
    peak = _rss_bytes("VmHWM:")  # this process's own peak (ru_maxrss may carry the parent's)
    print(json.dumps({"variant": name, "wall_s": wall, "peak_rss": peak, "baseline_rss": baseline}))


def same_output(a: Path, b: Path) -> str:
    """Every tensor of one output equals the other's (names, shapes, values)."""
    from safetensors import safe_open

    def tensors(root: Path) -> dict[str, Any]:
        found = {}
        for path in sorted(root.glob("*.safetensors")):
            with safe_open(str(path), "pt") as handle:
                found |= {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        return found

    x, y = tensors(a), tensors(b)
    if set(x) != set(y):
        return f"names differ: {sorted(set(x) ^ set(y))[:5]}"
    bad = [k for k in x if x[k].shape != y[k].shape or not bool((x[k] == y[k]).all())]
    return f"{len(x)} tensors, {'all equal' if not bad else f'{len(bad)} differ: {bad[:5]}'}"


def main() -> None:
    sys.path.insert(0, str(HERE))  # for _measure and dcp only (see the end of this file)
    import dcp as dcp_bench
    from _measure import Figure, settle, table

    sys.path.remove(str(HERE))

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--with-dcp",
        action="store_true",
        help="also ckptflow on bench/dcp.py's FSDP2 checkpoint of the same size (generated if "
        "missing): the other streamed DCP format, measured the same way",
    )
    args = parser.parse_args()
    root = checkpoint()
    size = sum(f.stat().st_size for f in (root / "ckpt").rglob("*.distcp"))
    print(f"checkpoint: {root / 'ckpt'}  {size / 1e9:.2f} GB of .distcp (TP={CASE['tp']})")
    # variant -> (how it runs, source, base)
    runs = {
        "ckptflow": ("ckptflow", str(root / "ckpt"), str(root / "base")),
        "megatron": ("megatron", str(root / "ckpt"), str(root / "base")),
    }
    if args.with_dcp:
        fsdp = dcp_bench.checkpoint()
        runs["ckptflow, FSDP2 DCP (bench/dcp.py)"] = (
            "ckptflow",
            str(fsdp / "dcp"),
            str(fsdp / "base"),
        )
    results: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    for repeat in range(args.repeat):
        for name, (how, src, base) in runs.items():  # interleaved: none always on a warmer cache
            dst = OUT / f"run-megatron-{how}"
            shutil.rmtree(dst, ignore_errors=True)
            settle()
            done = subprocess.run(
                [sys.executable, __file__, "variant", how, src, str(dst), base],
                check=False,
                env=env,
                cwd=REPO,
                capture_output=True,
                text=True,
            )
            if done.returncode:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(name, results[name][-1], flush=True)
            if repeat == 0 and name == "megatron":
                print(
                    "outputs:",
                    same_output(OUT / "run-megatron-ckptflow", OUT / "run-megatron-megatron"),
                )
    for how in ("ckptflow", "megatron"):
        shutil.rmtree(OUT / f"run-megatron-{how}", ignore_errors=True)
    figures = {n: [Figure.of(n, r) for r in runs] for n, runs in results.items()}
    print(table(figures, size / 1e6))


if __name__ == "__main__":
    # This file is bench/megatron.py: with bench/ on the path, `import megatron` would be itself
    # (megatron is a namespace package: any megatron.py on the path wins).
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    if len(sys.argv) > 1 and sys.argv[1] == "generate":
        sys.path.insert(0, str(REPO))
        generate(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "variant":
        sys.path.insert(0, str(REPO))
        variant(*sys.argv[2:6])
    else:
        main()
