"""`ckptflow verify | test-model`: proof a user can run on any model directory.

`test-model` also takes the spellings of the `test_model.py` script it replaces
(`--model_path`, `--test_prompts`, `--benchmark_samples`, `--output_file`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ckpt_core.errors import UsageError

VERIFY_HELP = """\
Checks, in order: files (sizes and sha256 against manifest.json, when OUT has one); index
(every indexed file present, headers whole, no duplicate or overlapping tensors, every tensor
readable); keys (a strict load through the auto class config.json's `architectures` names, on
the meta device: missing and unexpected keys, no weights read); against (--against REF: every
tensor's name, shape, dtype and values against REF, streamed, exact after casting REF to OUT's
dtype unless --atol/--rtol); logits (--logits: both loaded as models, logits on a fixed input;
this loads both models into RAM: for small models). Exit 0 only when every check holds, 1 when
one fails, 2 when OUT cannot be read at all."""


def add_parsers(subparsers: Any) -> None:
    verify = subparsers.add_parser(
        "verify",
        help="check a model directory: manifest, index, strict keys, tensors against a reference",
        description=VERIFY_HELP,
    )
    verify.add_argument("out", help="the model directory to check (local path or URL)")
    verify.add_argument(
        "--against", metavar="REF",
        help="a reference checkpoint in any format ckptflow reads (DeepSpeed, DCP, HF, .pth...)",
    )  # fmt: skip
    verify.add_argument("--format", help="REF's format, instead of detecting it")
    verify.add_argument(
        "--base", metavar="DIR",
        help="config to check the keys with when OUT has none; config for reading REF",
    )  # fmt: skip
    verify.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default 0)")
    verify.add_argument("--rtol", type=float, default=0.0, help="relative tolerance (default 0)")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.add_argument(
        "--logits", action="store_true",
        help="also compare logits on a fixed input with REF's (loads both models: small models)",
    )  # fmt: skip
    verify.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda", "auto"],
        help="--against: where REF's rank pieces are merged and cast, as convert --device",
    )  # fmt: skip
    verify.add_argument(
        "--s3-endpoint", metavar="URL", help="S3-compatible endpoint (else AWS_ENDPOINT_URL)"
    )
    verify.set_defaults(handler=run_verify)

    test = subparsers.add_parser(
        "test-model",
        help="load a model strictly, generate greedily from prompts, time it, write JSON",
    )
    test.add_argument("model", nargs="?", help="the model directory (or --model_path)")
    test.add_argument("--model_path", "--model-path", dest="model_path", help=argparse.SUPPRESS)
    test.add_argument(
        "--prompt", action="append", dest="prompt", metavar="TEXT",
        help="a prompt (repeatable; default: three built-in prompts)",
    )  # fmt: skip
    test.add_argument("--test_prompts", "--test-prompts", nargs="+", help=argparse.SUPPRESS)
    test.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=32)
    test.add_argument(
        "--benchmark", action="store_true", help="time each prompt over several samples"
    )
    test.add_argument(
        "--benchmark-samples", "--benchmark_samples", type=int, default=None, metavar="K",
        help="samples per prompt with --benchmark (default 5; giving it implies --benchmark)",
    )  # fmt: skip
    test.add_argument(
        "--output-file", "--output_file", metavar="FILE",
        help="write the JSON here (default: print it)",
    )  # fmt: skip
    test.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    test.add_argument(
        "--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
        help="load dtype (auto: as saved)",
    )  # fmt: skip
    test.add_argument("--seed", type=int, default=0)
    test.set_defaults(handler=run_test)


def run_verify(args: argparse.Namespace) -> int:
    from ckpt_core.proof.compare import Tolerance
    from ckpt_core.proof.verify_dir import verify_dir

    if args.atol < 0 or args.rtol < 0:
        raise UsageError("--atol and --rtol must be >= 0")
    report = verify_dir(
        args.out,
        against=args.against,
        base=args.base,
        tolerance=Tolerance(args.atol, args.rtol),
        logits=args.logits,
        against_format=args.format,
        device=args.device,
    )
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(report.text())
    return 0 if report.ok else 1


def run_test(args: argparse.Namespace) -> int:
    from ckpt_core.proof.test_model import DEFAULT_PROMPTS, run_test_model

    model = args.model or args.model_path
    if not model or (args.model and args.model_path and args.model != args.model_path):
        raise UsageError("test-model: give the model directory once (MODEL or --model_path)")
    prompts = [*(args.prompt or []), *(args.test_prompts or [])] or list(DEFAULT_PROMPTS)
    samples = 0
    if args.benchmark or args.benchmark_samples is not None:
        samples = 5 if args.benchmark_samples is None else args.benchmark_samples
    if samples < 0 or args.max_new_tokens < 1:
        raise UsageError("--benchmark-samples must be >= 0 and --max-new-tokens >= 1")
    result = run_test_model(
        model,
        prompts=prompts,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        benchmark_samples=samples,
    )
    text = json.dumps(result, indent=2) + "\n"
    if args.output_file:
        Path(args.output_file).write_text(text)
        summary = result["aggregate"]
        print(
            f"test-model {model}: {summary['prompts']} prompt(s), {summary['new_tokens']} new "
            f"tokens, {summary['tokens_per_second']} tokens/s on {result['device']}; "
            f"JSON in {args.output_file}",
            file=sys.stderr,
        )
    else:
        sys.stdout.write(text)
    return 0
