"""`ckptflow`: one-off conversions with progress bars; `--prefect` runs the same as a flow run."""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections.abc import Callable, Sequence
from importlib import import_module
from typing import TYPE_CHECKING

from ckpt_core.errors import CkptError

if TYPE_CHECKING:
    from ckpt_core.pipeline.conversion import ConvertOptions

Handler = Callable[[argparse.Namespace], int]
# Modules that add subcommands: each has add_parsers(subparsers); a missing one is skipped.
PLUGINS = (
    "ckptflow.cli_vlm",
    "ckptflow.cli_resolve",
    "ckptflow.cli_dropin",  # ds2hf, fsdp2hf, hf2fsdp, bagel2hf: the old scripts' flags
    "ckptflow.cli_verify",  # verify, test-model
    "ckptflow.cli_deploy",  # deploy: the work pool and deployments/prefect.yaml on a server
)
DEMO_DIR = ".ckptflow-demo"
EXIT_BROKEN_PIPE = 128 + 13  # what a tool killed by SIGPIPE exits with


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from ckptflow.demo import prepare_env

        # Prefect reads its settings when first imported: point it at the demo's home first.
        prepare_env(argv[argv.index("--workdir") + 1] if "--workdir" in argv else DEMO_DIR)
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    if getattr(args, "s3_endpoint", None):
        from ckpt_core.io.storage import configure

        configure("s3", endpoint_url=args.s3_endpoint)
    try:
        code = handler(args)
        sys.stdout.flush()  # a closed pipe fails here, not in the interpreter's flush at exit
        return code
    except BrokenPipeError:
        return stdout_closed()
    except CkptError as e:
        print(f"ckptflow: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ckptflow: interrupted; nothing was published", file=sys.stderr)
        return 130


def stdout_closed() -> int:
    """Whoever read stdout is gone (`ckptflow detect SRC --json | head -1`): stop quietly, as
    standard tools do, with 128 + SIGPIPE. stdout is pointed at devnull (the Python docs'
    recipe for SIGPIPE) so that the interpreter's last flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_BROKEN_PIPE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ckptflow", description=__doc__)
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    detect = sub.add_parser("detect", help="say which checkpoint format a path or URL holds")
    detect.add_argument("src")
    detect.add_argument(
        "--json", action="store_true", help="print JSON with format and tensor counts"
    )
    detect.set_defaults(handler=run_detect)

    convert = sub.add_parser("convert", help="convert a checkpoint into a HF safetensors directory")
    convert.add_argument(
        "src", help="checkpoint directory or URL (local, /mnt/share, s3://, memory://)"
    )
    convert.add_argument("dst", help="output directory or URL")
    convert.add_argument(
        "--dtype", default="default", choices=["default", "bf16", "fp16", "fp32", "keep"],
        help="floating-point dtype written (keep: each tensor's stored dtype); default by --to: "
        "bf16 for hf, keep for dcp (dcp.load casts into the model's own dtype), fp16 for pth",
    )  # fmt: skip
    convert.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB, 200KB, or bytes")
    convert.add_argument("--base", help="HF model dir/URL to take config and tokenizer from")
    convert.add_argument("--overwrite", action="store_true", help="replace a different conversion")
    convert.add_argument("--tag", help="DeepSpeed checkpoint tag (default: the `latest` file)")
    convert.add_argument(
        "--exclude-frozen", action="store_true", help="DeepSpeed: skip frozen params"
    )
    convert.add_argument(
        "--allow-missing",
        action="append",
        default=[],
        metavar="PATTERN",
        help="model keys (fnmatch) allowed to be absent from the checkpoint",
    )
    convert.add_argument(
        "--lora", default="fuse", choices=["fuse", "keep"],
        help="a PEFT LoRA adapter: fuse it into --base (default), or keep it as an adapter dir",
    )  # fmt: skip
    convert.add_argument(
        "--strip-prefix", action="append", metavar="PREFIX",
        help="strip this prefix from tensor names (repeatable; `module.` and `_orig_mod.` are "
        "stripped without it when that makes every name the model's)",
    )  # fmt: skip
    convert.add_argument(
        "--latest", action="store_true",
        help="SRC holds checkpoint-N directories (a Trainer output_dir): convert the newest",
    )  # fmt: skip
    convert.add_argument(
        "--allow-overflow", action="store_true",
        help="write finite values the --dtype cannot hold as inf (default: fail naming the tensor)",
    )  # fmt: skip
    convert.add_argument("--format", help="force a format instead of detecting it")
    convert.add_argument(
        "--to", default="hf", choices=["hf", "dcp", "pth"],
        help="output format: a HF directory (default), a torch Distributed Checkpoint to start "
        "FSDP training from, or one .pth state dict (the whole dict in one pickle: it needs "
        "one copy of the output in RAM)",
    )  # fmt: skip
    convert.add_argument(
        "--models", default="both", choices=["main", "ema", "both"],
        help="BAGEL-style sources with main and EMA weights: which to write (default both)",
    )  # fmt: skip
    convert.add_argument(
        "--dcp-key", metavar="KEY", help="--to dcp: nest the state dict under KEY (e.g. model)"
    )
    convert.add_argument("--stage", help="--to pth: the training stage in the file name")
    convert.add_argument(
        "--hidden-size", type=int, help="--to pth: the hidden size in the file name"
    )
    convert.add_argument("--moe", action="store_true", help="--to pth: add _moe to the file name")
    convert.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda", "auto"],
        help="where rank pieces are merged and cast (auto: cuda when present); same bytes",
    )  # fmt: skip
    convert.add_argument("--workers", type=int, default=2, help="shards written in parallel")
    convert.add_argument(
        "--wait-for-lock", type=float, metavar="SECONDS",
        help="wait this long for another conversion to the same destination (default: fail)",
    )  # fmt: skip
    convert.add_argument(
        "--cache-dir", metavar="DIR",
        help="copy a remote source here first and read it locally (default: ranged reads)",
    )  # fmt: skip
    convert.add_argument(
        "--s3-endpoint", metavar="URL",
        help="S3-compatible endpoint (else AWS_ENDPOINT_URL); keys come from AWS_* variables",
    )  # fmt: skip
    convert.add_argument("--prefect", action="store_true", help="run as a Prefect flow run")
    convert.set_defaults(handler=run_convert)

    demo = sub.add_parser("demo", help="convert a tiny model through the Prefect flow, offline")
    demo.add_argument("--workdir", default=DEMO_DIR)
    demo.set_defaults(handler=run_demo)

    for name in PLUGINS:
        try:
            module = import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.add_parsers(sub)
    return parser


def run_detect(args: argparse.Namespace) -> int:
    from ckpt_core.formats.protocol import OpenOptions
    from ckpt_core.formats.registry import detect
    from ckpt_core.io.storage import Location

    fmt = detect(args.src)
    if not args.json:
        print(fmt.name)
        return 0
    reader = fmt.open(Location(args.src), OpenOptions())
    index = reader.index()
    facts = reader.facts()
    print(
        json.dumps(
            {
                "format": fmt.name,
                "url": args.src,
                "tensors": len(index),
                "tensor_bytes": sum(t.nbytes for t in index.values()),
                "files": facts.files,
                "notes": facts.notes,
            },
            indent=2,
        )
    )
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from ckpt_core.pipeline.checkpoints import resolve_checkpoint
    from ckpt_core.pipeline.conversion import ConvertFlags, options_from

    # The flow's parameters and options_from's are the same flags, passed by name.
    flags = {f.name: getattr(args, f.name) for f in fields(ConvertFlags)}
    if args.prefect:
        from flows.convert import convert_flow_with

        run = convert_flow_with(args.workers)
        outcome = run(args.src, args.dst, **flags, wait_seconds=args.wait_for_lock)
        print(json.dumps(outcome))
        return 0
    options = options_from(**flags)
    src = resolve_checkpoint(args.src, latest=args.latest)
    return convert_in_process(
        src, args.dst, options, workers=args.workers, wait_seconds=args.wait_for_lock
    )


def convert_in_process(
    src: str,
    dst: str,
    options: ConvertOptions,
    *,
    workers: int = 2,
    wait_seconds: float | None = None,
) -> int:
    from tqdm import tqdm

    from ckpt_core.pipeline import convert as core

    # What the imports built (~170k objects, mostly torch's) lives as long as the command:
    # frozen, it is left out of garbage collections, each of which walked it all (~90 ms a
    # time here).
    gc.freeze()
    plan = core.plan_conversion(src, dst, options)
    if plan.already_done:
        print(f"{dst} already holds this conversion: nothing to do")
        return 0
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"{src} ({plan.format}) -> {dst}: {plan.tensor_count} tensors, {len(plan.shards)} shard(s), "
        f"{options.dtype}"
    )
    with tqdm(total=2 * plan.total_bytes, unit="B", unit_scale=True, desc="write+verify") as bar:
        result = core.run_plan(
            plan, on_bytes=bar.update, workers=workers, wait_seconds=wait_seconds
        )
    print(result.message)
    if result.report:
        print(result.report.text())
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from ckptflow.demo import run

    return run(args.workdir)


if __name__ == "__main__":
    raise SystemExit(main())
