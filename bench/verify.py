"""`ckptflow verify --against` a ~1 GB ZeRO-3 checkpoint: peak RSS and wall time, side by side
with what one does without it (both loaded into RAM, then compared).

    .venv/bin/python bench/verify.py [--layers 16] [--repeat 3]

The checkpoint is bench/zero3.py's (generated once under bench/out/ by the same generator);
its ckptflow fp32 conversion is made once beside it. Each variant runs in its own interpreter
(bench/_measure.py: wall time, and peak RSS = VmHWM next to the RSS after its imports):

  ckptflow verify --against  verify_dir(OUT, against=CKPT): manifest sha256, index, strict keys
                             on meta, every tensor streamed against the DeepSpeed reader
  ckptflow verify            the same without --against (manifest, index, keys)
  tensors only               the streamed comparison alone (compare_tensors), no key check:
                             what is left once transformers' model code is not imported
  load both + compare        zero_to_fp32's get_fp32_state_dict_from_zero_checkpoint(CKPT) and
                             safetensors' load_file of every output shard, torch.equal per tensor

Goal (issue 13): `verify --against` under 300 MB peak RSS. The ckptflow variants import
transformers' model code before the clock starts (the key check and REF's layout need it,
~115 MB of RSS whatever the model), as the load variant imports deepspeed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _measure import Figure, measure, table  # noqa: E402
from zero3 import OUT, build_checkpoint  # noqa: E402

IMPORTS = {
    "ckptflow": f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from ckpt_core.proof.verify_dir import verify_dir
        from ckpt_core.formats.registry import formats
        formats()  # the format modules imported now count in the baseline
        import transformers.modeling_utils  # the key check's (and source layout's) model code
    """,
    "load": """
        import torch
        from safetensors.torch import load_file
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    """,
}


def body(variant: str, out: Path, src: Path) -> str:
    if variant == "ckptflow verify --against":
        return f"""
            report = verify_dir({str(out)!r}, against={str(src)!r})
            assert report.ok, report.text()
        """
    if variant == "ckptflow verify":
        return f"""
            report = verify_dir({str(out)!r})
            assert report.ok, report.text()
        """
    if variant == "tensors only":
        return f"""
            import torch
            from ckpt_core.io.storage import Location
            from ckpt_core.proof.compare import Tolerance, compare_tensors
            from ckpt_core.proof.files import check_files
            from ckpt_core.proof.verify_dir import open_reference
            files = check_files(Location({str(out)!r}), read_all=False)
            ref, _ = open_reference({str(src)!r}, {str(out)!r}, None, None)
            result = compare_tensors(files.reader, ref, target=torch.float32, tolerance=Tolerance(),
                                     tied={{}}, files_of={{}})
            assert not result.failures and result.compared
        """
    return f"""
        ref = get_fp32_state_dict_from_zero_checkpoint({str(src)!r})
        ours = {{}}
        for path in sorted(__import__("pathlib").Path({str(out)!r}).glob("*.safetensors")):
            ours.update(load_file(path))
        assert set(ours) <= set(ref)
        assert all(torch.equal(ours[n], ref[n]) for n in ours)
    """


def converted(src: Path, base: Path) -> Path:
    """ckptflow's fp32 output of the checkpoint, made once."""
    out = OUT / "verify-ckptflow-fp32"
    if not (out / "_SUCCESS").exists():
        from ckpt_core.pipeline.conversion import options_from
        from ckpt_core.pipeline.convert import convert

        convert(str(src), str(out), options_from(dtype="fp32", base=str(base), overwrite=True))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    root = build_checkpoint(args.layers, 0)
    src, base = root / "stage3" / "ckpt", root / "stage3" / "base"
    out = converted(src, base)
    size = sum(f.stat().st_size for f in src.rglob("*.pt"))
    print(f"checkpoint: {src} ({size / 1e9:.2f} GB of .pt files); output {out}")
    variants = [
        "ckptflow verify --against",
        "ckptflow verify",
        "tensors only",
        "load both + compare",
    ]
    runs: dict[str, list[Figure]] = {v: [] for v in variants}
    for _ in range(args.repeat):
        for variant in variants:  # interleaved: no variant always on the warmer page cache
            imports = IMPORTS["load" if variant.startswith("load") else "ckptflow"]
            runs[variant].append(measure(variant, imports, body(variant, out, src)))
    print(table(runs, size / 1e6))
    results = {v: [f.__dict__ for f in figures] for v, figures in runs.items()}
    (OUT / "verify-results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
