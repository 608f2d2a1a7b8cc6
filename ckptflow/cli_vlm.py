"""`ckptflow split | merge | pipeline | tiny-train`: disaggregated VLM checkpoints.

Flags of `split` and `merge` match the scripts they replace (`--model-name`, `--output-dir`,
`--checkpoint-dir`, `--parallel-size`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any


def add_parsers(subparsers: Any) -> None:
    split = subparsers.add_parser(
        "split", help="split a HF VLM into vision_model.pt and text_model.pt for training"
    )
    split.add_argument("--model-name", required=True, help="HF model directory or URL")
    split.add_argument("--output-dir", required=True)
    split.add_argument("--overwrite", action="store_true", help="replace a different split")
    split.set_defaults(handler=run_split)

    merge = subparsers.add_parser(
        "merge", help="merge vision/text tensor-parallel rank files into one HF model"
    )
    merge.add_argument("--checkpoint-dir", required=True, help="EPOCH_DIR with vision/ text/")
    merge.add_argument("--output-dir", required=True)
    merge.add_argument("--model-name", required=True, help="the base HF model (config, tokenizer)")
    merge.add_argument(
        "--parallel-size", type=int, help="rank count (default: metadata.json's parallel_size)"
    )
    merge.add_argument("--format", default="safetensors", choices=["safetensors", "bin"])
    merge.add_argument("--dtype", default="keep", choices=["keep", "bf16", "fp16", "fp32"])
    merge.add_argument("--max-shard-size", default="5GB")
    merge.add_argument("--overwrite", action="store_true")
    merge.add_argument("--workers", type=int, default=2)
    merge.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda", "auto"],
        help="where rank pieces are merged and cast (auto: cuda when present); same bytes",
    )  # fmt: skip
    merge.add_argument(
        "--wait-for-lock", type=float, metavar="SECONDS",
        help="wait this long for another run writing the same output (default: fail)",
    )  # fmt: skip
    merge.set_defaults(handler=run_merge)

    pipeline = subparsers.add_parser(
        "pipeline", help="run the post_training flow: split -> train -> merge -> test"
    )
    pipeline.add_argument("--model-name", required=True)
    pipeline.add_argument("--work-dir", required=True, help="split/, train/, merged/ go here")
    pipeline.add_argument(
        "--train-command",
        help="your training command; {split_dir} {output_dir} {parallel_size} are filled in "
        "(else --split-dir/--output-dir are appended); default: the built-in tiny trainer",
    )
    pipeline.add_argument("--parallel-size", type=int, default=2)
    pipeline.add_argument("--steps", type=int, default=2, help="built-in trainer steps")
    pipeline.add_argument("--format", default="safetensors", choices=["safetensors", "bin"])
    pipeline.add_argument("--dtype", default="keep", choices=["keep", "bf16", "fp16", "fp32"])
    pipeline.add_argument("--train-retries", type=int, default=2)
    pipeline.add_argument("--retry-delay", type=float, default=5.0, help="seconds")
    pipeline.add_argument("--overwrite", action="store_true")
    pipeline.set_defaults(handler=run_pipeline)

    tiny = subparsers.add_parser(
        "tiny-train", help="the built-in demo trainer: split dir -> TP rank files"
    )
    tiny.add_argument("--split-dir", required=True)
    tiny.add_argument("--output-dir", required=True)
    tiny.add_argument("--parallel-size", type=int, default=2)
    tiny.add_argument("--steps", type=int, default=2)
    tiny.set_defaults(handler=run_tiny_train)


def run_split(args: argparse.Namespace) -> int:
    from ckpt_core.vlm.split import split

    result = split(args.model_name, args.output_dir, overwrite=args.overwrite)
    verb = "already split" if result.skipped else "split"
    print(
        f"{verb} {args.model_name} -> {args.output_dir}: {result.counts} (layout {result.layout})"
    )
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from ckpt_core.units import parse_size_bytes
    from ckpt_core.vlm.merge import merge

    result = merge(
        args.checkpoint_dir,
        args.output_dir,
        args.model_name,
        parallel_size=args.parallel_size,
        output_format=args.format,
        dtype=args.dtype,
        max_shard_bytes=parse_size_bytes(args.max_shard_size),
        overwrite=args.overwrite,
        workers=args.workers,
        wait_seconds=args.wait_for_lock,
        device=args.device,
    )
    print(f"{result.message}: {result.tensors} tensors ({result.output_format})")
    return 0


def run_pipeline(args: argparse.Namespace) -> int:
    from flows.post_training import post_training

    outcome: dict[str, Any] = post_training(
        args.model_name,
        args.work_dir,
        train_command=args.train_command,
        parallel_size=args.parallel_size,
        steps_per_rank=args.steps,
        output_format=args.format,
        dtype=args.dtype,
        train_retries=args.train_retries,
        train_retry_delay_seconds=args.retry_delay,
        overwrite=args.overwrite,
    )
    print(json.dumps(outcome, indent=2, default=str))
    return 0


def run_tiny_train(args: argparse.Namespace) -> int:
    from ckpt_core.vlm.tiny_trainer import train

    def progress(step: int, steps: int, loss: float) -> None:
        print(f"tiny-train: step {step}/{steps}: loss {loss:.4f}", file=sys.stderr, flush=True)

    print(
        f"tiny-train: {args.split_dir} -> {args.output_dir}, {args.parallel_size} ranks, "
        f"{args.steps} steps",
        file=sys.stderr,
        flush=True,
    )
    result = train(
        args.split_dir, args.output_dir, args.parallel_size, steps=args.steps, on_step=progress
    )
    print(json.dumps(asdict(result)))
    return 0
