"""Shared by the kill-and-resume and concurrency tests: `ckptflow convert` started as a
subprocess (fp32, 40 kB shards, one worker, slowed per tensor by the test-only
CKPTFLOW_TEST_DELAY_PER_TENSOR_SECONDS), SIGKILLed at a chosen point or waited for, and an
output tree compared by content."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAX_SHARD = 40_000
DELAY = "0.04"


def tree(path: Path) -> dict[str, str]:
    """Every file under `path`, by relative name, with its sha256."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def start_cli(
    src: str, dst: str, env: dict[str, str] | None = None, delay: str = DELAY
) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "ckptflow.cli", "convert", src, dst]
    args += ["--dtype", "fp32", "--max-shard-size", str(MAX_SHARD), "--workers", "1"]
    env = {**(env or os.environ), "CKPTFLOW_TEST_DELAY_PER_TENSOR_SECONDS": delay}
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def kill_when(process: subprocess.Popen[bytes], ready: Callable[[], bool], what: str) -> None:
    """SIGKILLs the run as soon as `ready()` holds (polled); fails the test if the run ends first
    or the point is not reached within a minute."""
    deadline = time.monotonic() + 60
    while not ready():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"run ended before {what}: {process.returncode}\n{out!r}\n{err!r}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"never reached {what}")
        time.sleep(0.003)
    process.send_signal(signal.SIGKILL)
    process.wait(10)


def finish(process: subprocess.Popen[bytes]) -> str:
    """Waits for a run, asserts it succeeded, returns its stdout."""
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err.decode()
    return out.decode()
