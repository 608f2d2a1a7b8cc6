"""What running a conversion through Prefect costs on top of the conversion itself, on the tiny
Qwen2 (`ckptflow demo`'s model, 0.23 MB of weights: the conversion is nearly free, so what is
left is the overhead):

- in-process: `ckpt_core.pipeline.convert.convert()` in a warm interpreter;
- flow on the server: `convert_flow(...)` in that same warm interpreter, reporting to a running
  `prefect server` (PREFECT_API_URL): flow and task runs, states, logs, artifacts over HTTP;
- deployment run: `convert/manual` created through the API and run by a process worker (its
  poll, a fresh interpreter with its imports, the flow), from the request to Completed;
- `ckptflow convert` as a command: the same fresh interpreter and imports, without Prefect.

Each variant converts to a new destination, rounds interleaved; fastest and median in seconds.
Run from the project root: .venv/bin/python bench/prefect_overhead.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from tests.helpers.prefect_server import BIN, PrefectStack  # noqa: E402

WARM = """
import json, sys, time
from ckpt_core.pipeline.convert import ConvertOptions, convert
from flows.convert import convert_flow
src, out, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
times = {"in-process convert()": [], "convert flow on the server": []}
for n in range(rounds + 1):  # round 0 warms both up, untimed
    t0 = time.perf_counter()
    convert(src, f"{out}/plain-{n}", ConvertOptions(dtype="bf16"))
    t1 = time.perf_counter()
    convert_flow(src, f"{out}/flow-{n}", dtype="bf16")
    t2 = time.perf_counter()
    if n:
        times["in-process convert()"].append(t1 - t0)
        times["convert flow on the server"].append(t2 - t1)
print("__TIMES__" + json.dumps(times))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from ckptflow.tiny import build_tiny_qwen2

    work = Path(tempfile.mkdtemp(prefix="ckptflow-bench-prefect-"))
    src = work / "tiny"
    build_tiny_qwen2(seed=0).save_pretrained(src)
    for name in ("runs", "hf", "out"):
        (work / name).mkdir()
    stack = PrefectStack(work)
    times: dict[str, list[float]] = {}
    try:
        stack.start_server()
        paths = ["--root", str(work / "runs"), "--out-root", str(work / "hf")]
        stack.command([str(BIN / "ckptflow"), "deploy", *paths])
        stack.start_worker("ckptflow")
        manual = stack.deployment("convert", "manual")["id"]
        hourly = stack.deployment("watch", "hourly")["id"]
        stack.http.patch(f"deployments/{hourly}", json={"paused": True})
        # One deployment run first, untimed: the worker's first poll and its imports.
        first = stack.run_deployment(manual, src=str(src), dst=str(work / "out" / "dep-0"))
        stack.wait(first["id"], 300)
        warm = subprocess.run(
            [sys.executable, "-c", WARM, str(src), str(work / "out"), str(args.rounds)],
            env=stack.env,
            capture_output=True,
            text=True,
            check=True,
        )
        line = next(x for x in warm.stdout.splitlines() if x.startswith("__TIMES__"))
        times.update(json.loads(line.removeprefix("__TIMES__")))
        for n in range(1, args.rounds + 1):
            t0 = time.perf_counter()
            run = stack.run_deployment(manual, src=str(src), dst=str(work / "out" / f"dep-{n}"))
            assert stack.wait(run["id"], 300)["state_type"] == "COMPLETED"
            times.setdefault("deployment run, request to Completed", []).append(
                time.perf_counter() - t0
            )
            t0 = time.perf_counter()
            dst = str(work / "out" / f"cmd-{n}")
            subprocess.run([str(BIN / "ckptflow"), "convert", str(src), dst], check=True)
            times.setdefault("`ckptflow convert` command", []).append(time.perf_counter() - t0)
    finally:
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.rounds} rounds, seconds: fastest (median)\n")
    print("| variant | wall s |\n| --- | --- |")
    for name, values in times.items():
        print(f"| {name} | {min(values):.2f} ({statistics.median(values):.2f}) |")


if __name__ == "__main__":
    main()
