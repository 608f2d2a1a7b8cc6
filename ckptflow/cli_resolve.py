"""`ckptflow resolve`: where a MiniMind-style trainer's pretrained weights are."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parsers(subparsers: Any) -> None:
    resolve = subparsers.add_parser(
        "resolve", help="find {stage}_{hidden}[_moe].pth: --path > env > remote dir > local dir"
    )
    resolve.add_argument("--stage", required=True, help="pretrain, full_sft, rlhf, grpo, ...")
    resolve.add_argument("--hidden-size", type=int, required=True)
    resolve.add_argument("--moe", action="store_true")
    resolve.add_argument("--remote-dir", help="directory URL searched after the environment")
    resolve.add_argument("--local-dir", default="./out", help="searched last (default ./out)")
    resolve.add_argument(
        "--path", dest="explicit", help="an explicit file; an error if it does not exist"
    )
    resolve.add_argument("--json", action="store_true", help="print url, source and searched")
    resolve.set_defaults(handler=run_resolve)


def run_resolve(args: argparse.Namespace) -> int:
    from ckpt_core.pipeline.resolve import resolve

    # The flags' dests are resolve()'s option names.
    options = {name: getattr(args, name) for name in ("moe", "remote_dir", "local_dir", "explicit")}
    found = resolve(args.stage, args.hidden_size, **options).as_dict()
    print(json.dumps(found, indent=2) if args.json else found["url"])
    return 0
