"""Benchmark: publishing to an object store. A ~0.5 GB fp32 HF checkpoint is converted by ckptflow
straight to a loopback S3 server (moto in server mode), next to s3fs `put` of the same output
bytes (the upload floor), and converted back from the store to local disk (ranged reads).

ckptflow's figure includes everything a conversion does: read the source, write the shards to
the store, re-read every shard from the store to verify it bit for bit, index, manifest, marker.

    .venv/bin/python bench/s3.py [--gb 0.5] [--out bench/out]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _measure import measure, table  # noqa: E402
from convert import make_checkpoint  # noqa: E402

from tests.s3server import CREDENTIALS, MotoServer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args()
    src = args.out / f"s3-src-{args.gb:g}gb"
    size = make_checkpoint(src, args.gb)
    local = args.out / "s3-local-out"
    shutil.rmtree(local, ignore_errors=True)
    server = MotoServer(log=args.out / "moto.log")
    server.start()
    os.environ.update({**CREDENTIALS, "AWS_ENDPOINT_URL": server.endpoint})
    try:
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True).mkdir("bench")
        options = "ConvertOptions(dtype='keep', max_shard_bytes=250_000_000)"
        imports = "from ckpt_core.pipeline.convert import ConvertOptions, convert"
        figures = [
            measure(
                "ckptflow convert local -> s3 (write+verify)",
                imports,
                f"convert({str(src)!r}, 's3://bench/ckptflow', {options})",
            ),
        ]
        # The same bytes as ckptflow wrote, uploaded by s3fs alone.
        measure(
            "(local output for put)", imports, f"convert({str(src)!r}, {str(local)!r}, {options})"
        )
        figures.append(
            measure(
                "s3fs put of the same bytes",
                "import s3fs",
                f"s3fs.S3FileSystem().put({str(local)!r} + '/', 'bench/put/', recursive=True)",
            )
        )
        back = args.out / "s3-back"
        shutil.rmtree(back, ignore_errors=True)
        figures.append(
            measure(
                "ckptflow convert s3 -> local (ranged reads)",
                imports,
                f"convert('s3://bench/ckptflow', {str(back)!r}, {options})",
            )
        )
        print(f"checkpoint: {size / 1e9:.2f} GB fp32, loopback moto server {server.endpoint}")
        print(table({f.name: [f] for f in figures}, size / 1e6))
    finally:
        server.kill()


if __name__ == "__main__":
    main()
