"""`ckptflow deploy` refuses, in one line and before storing anything, what would give
deployments that cannot run: this site's paths on another machine, no server to deploy to, a
failed-run notification target that cannot work.
(The deployments it makes are run for real in tests/test_prefect_server.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CKPTFLOW = str(Path(sys.executable).parent / "ckptflow")


def deploy(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # no profile with an API URL
    return subprocess.run(
        [CKPTFLOW, "deploy", *args], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.skipif(Path("/openbayes/home/out").exists(), reason="this is the site itself")
def test_the_sites_paths_are_refused_where_they_do_not_exist(tmp_path: Path) -> None:
    done = deploy(tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "ckptflow: error: hourly: parameter root is this site's default '/openbayes/home/out', "
        "which does not exist here: pass --root DIR (the path on the worker's host)"
    ]


def test_no_server_is_refused_naming_prefect_api_url(tmp_path: Path) -> None:
    done = deploy(tmp_path, "--root", str(tmp_path), "--out-root", str(tmp_path / "hf"))
    assert done.returncode == 2, done.stderr
    assert "PREFECT_API_URL" in done.stderr and "prefect server start" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--notify-webhook", "hooks.example.com/x"], "not an http(s) URL"),
        (["--notify-webhook", "file:///etc/passwd"], "not an http(s) URL"),
        (["--notify-block", "ops"], "name the block as TYPE/NAME"),
        (
            ["--notify-webhook", "https://h.example/x", "--notify-block", "slack-webhook/ops"],
            "not both",
        ),
    ],
)
def test_a_bad_notification_target_is_refused_before_the_server_is_asked(
    tmp_path: Path, flags: list[str], expected: str
) -> None:
    paths = ["--root", str(tmp_path), "--out-root", str(tmp_path / "hf")]
    done = deploy(tmp_path, *paths, *flags)  # no server: its refusal would name PREFECT_API_URL
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and flags[0] in lines[0], done.stderr
