"""`ckptflow ds2hf | fsdp2hf | hf2fsdp | bagel2hf`: the in-house scripts' command lines, as thin
aliases over `ckptflow convert` (same code path, same output, same manifest).

Each alias only renames flags: its arguments are stored under `convert`'s own names, laid over
`convert`'s defaults, and handed to `convert`'s handler. The README maps old lines to new.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ckpt_core.errors import UsageError

# `--model_type` of the DeepSpeed script -> what the base config's `architectures` must end with.
MODEL_TYPES: dict[str, tuple[str, ...]] = {
    "causal": ("ForCausalLM",),
    "vision2seq": ("ForConditionalGeneration", "ForVision2Seq", "ForImageTextToText"),
    "seq-cls": ("ForSequenceClassification",),
    "token-cls": ("ForTokenClassification",),
}


def add_parsers(subparsers: Any) -> None:
    ds = _alias(
        subparsers, "ds2hf", "DeepSpeed ZeRO checkpoint -> HF (zero_to_fp32 + save_pretrained)"
    )
    ds.add_argument(
        "--checkpoint_dir",
        dest="src",
        required=True,
        help="the DeepSpeed save dir (with `latest`) or the step folder itself",
    )
    ds.add_argument("--output_dir", dest="dst", required=True)
    ds.add_argument("--hf_base", dest="base", required=True, help="the HF model trained from")
    ds.add_argument("--tag", "-t", dest="tag", help="checkpoint tag (default: `latest`)")
    ds.add_argument("--exclude_frozen_parameters", dest="exclude_frozen", action="store_true")
    ds.add_argument("--model_type", choices=sorted(MODEL_TYPES),
                    help="checked against the base config's architectures")  # fmt: skip

    fsdp = _alias(subparsers, "fsdp2hf", "FSDP checkpoint (DCP or per-rank files) -> HF")
    fsdp.add_argument("--hf_base", dest="base", required=True)
    fsdp.add_argument("--checkpoint_dir", dest="src", required=True)
    fsdp.add_argument("--output_dir", dest="dst", required=True)

    back = _alias(subparsers, "hf2fsdp", "HF directory -> torch Distributed Checkpoint for FSDP")
    back.add_argument("--hf_checkpoint", dest="src", required=True)
    back.add_argument("--output", dest="dst", required=True)
    back.add_argument("--dcp_key", "--dcp-key", dest="dcp_key", help="nest under this top key")
    back.set_defaults(to="dcp")

    bagel = _alias(
        subparsers, "bagel2hf", "BAGEL sharded training dir -> release dir (no torchrun)"
    )
    bagel.add_argument("--checkpoint_dir", dest="src", required=True)
    bagel.add_argument("--output_dir", dest="dst", required=True)
    bagel.add_argument("--base_model_path", dest="base", required=True)
    bagel.add_argument("--models", choices=["main", "ema", "both"], default="both")


def _alias(subparsers: Any, name: str, what: str) -> argparse.ArgumentParser:
    """A subcommand whose arguments are `convert`'s under other spellings, plus the few flags
    every alias shares (the rest of `convert`'s keep their defaults)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name, help=f"{what}; alias of `ckptflow convert`"
    )
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "keep"])
    parser.add_argument("--max_shard_size", "--max-shard-size", dest="max_shard_size")
    parser.add_argument("--overwrite", action="store_true", default=None)
    parser.set_defaults(handler=_as_convert(name))
    return parser


def _as_convert(alias: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from ckptflow.cli import build_parser

        given = {k: v for k, v in vars(args).items() if v is not None and k != "handler"}
        model_type = given.pop("model_type", None)
        if model_type is not None:
            _check_model_type(alias, model_type, given["base"])
        converted = build_parser().parse_args(["convert", given.pop("src"), given.pop("dst")])
        vars(converted).update(given)
        handler: Callable[[argparse.Namespace], int] = converted.handler
        return handler(converted)

    return run


def _check_model_type(alias: str, model_type: str, base: str) -> None:
    """The old script built the model class `--model_type` named; ckptflow builds the one the
    base config describes, so a flag that disagrees with it is a mistake worth one line."""
    from ckpt_core.families.hf_layout import model_layout
    from ckpt_core.families.model_config import CONFIG, read_config
    from ckpt_core.io.storage import Location

    root = Location(base)
    config = read_config(root)
    if config is None:
        return  # no config: the conversion itself says what it could not check
    built = model_layout(config, root.file(CONFIG)).architecture
    if not built.endswith(MODEL_TYPES[model_type]):
        raise UsageError(
            f"{alias} --model_type {model_type}: {root.file(CONFIG)} describes a {built}; pass "
            "the --model_type matching it or leave it out (the base config decides the model)"
        )
