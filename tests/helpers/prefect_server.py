"""A real Prefect stack on loopback for the tests: `prefect server start` (own PREFECT_HOME,
analytics off, a free port), the commands the README gives, and a process worker, each a
subprocess in its own session (killed with its children at teardown), each logging to a file
that a failing test prints. Nothing listens or connects beyond 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from tests.s3server import HOST, SlowProxy, free_port

BIN = Path(sys.executable).parent
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class PrefectStack:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.processes: list[tuple[subprocess.Popen[bytes], Path]] = []
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(home / "prefect-home"),
            "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PREFECT_WORKER_QUERY_SECONDS": "1",  # the worker polls every second, not every 10
            "PYTHONUNBUFFERED": "1",
        }
        for name in ("PREFECT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID"):
            self.env.pop(name, None)  # the worker's storage settings come from the Secret block
        self.http = httpx.Client(base_url=self.api + "/", timeout=30)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def api(self) -> str:
        return f"{self.url}/api"

    def spawn(self, name: str, args: list[str], **env: str) -> subprocess.Popen[bytes]:
        log = self.home / f"{name}.log"
        out = open(log, "ab")  # noqa: SIM115  (the process writes it until teardown)
        process = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**self.env, **env},
            cwd=self.home,  # never the checkout: a deployment must not depend on it
            start_new_session=True,
        )
        self.processes.append((process, log))
        return process

    def start_server(self, timeout_seconds: float = 90) -> None:
        server = self.spawn(
            "server",
            [str(BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(self.port)],
        )
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"prefect server exited:\n{self.logs()}")
            with contextlib.suppress(httpx.HTTPError):
                if self.http.get("health").status_code == 200:
                    return
            time.sleep(0.3)
        raise RuntimeError(f"prefect server did not answer in {timeout_seconds} s:\n{self.logs()}")

    def start_worker(self, pool: str, **env: str) -> None:
        self.spawn("worker", [str(BIN / "prefect"), "worker", "start", "--pool", pool], **env)

    def command(self, args: list[str], timeout_seconds: float = 180) -> str:
        """A README command, run as a user would (same environment as the worker's host)."""
        done = subprocess.run(
            args,
            env=self.env,
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=timeout_seconds,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(f"{args} exited {done.returncode}:\n{done.stdout}{done.stderr}")
        return done.stdout

    # -- the API, as the UI reads it --------------------------------------------------------

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._answer(lambda: self.http.post(path, json=body or {}))

    def get(self, path: str) -> Any:
        return self._answer(lambda: self.http.get(path))

    def _answer(self, request: Callable[[], httpx.Response]) -> Any:
        """A busy server (SQLite writes queued behind the scheduler's) may time out or answer
        503: asked again, as Prefect's own client does. Every POST here is a read or carries an
        idempotency key, so asking again never makes a second run."""
        for attempt in range(4):
            try:
                response = request()
                if response.status_code != 503 or attempt == 3:
                    response.raise_for_status()
                    return response.json()
            except httpx.TimeoutException:
                if attempt == 3:
                    raise
            time.sleep(2)
        raise AssertionError("unreachable")

    def deployment(self, flow: str, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self.get(f"deployments/name/{flow}/{name}")
        return found

    def runs(self, deployment_id: str) -> list[dict[str, Any]]:
        body = {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}, "limit": 200}
        found: list[dict[str, Any]] = self.post("flow_runs/filter", body)
        return found

    def run_deployment(self, deployment_id: str, **parameters: Any) -> dict[str, Any]:
        made: dict[str, Any] = self.post(
            f"deployments/{deployment_id}/create_flow_run",
            {"parameters": parameters, "idempotency_key": uuid.uuid4().hex},
        )
        return made

    def wait(self, run_id: str, timeout_seconds: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            run: dict[str, Any] = self.get(f"flow_runs/{run_id}")
            if run["state_type"] in FINAL:
                return run
            time.sleep(0.5)
        raise AssertionError(
            f"flow run {run_id} not finished in {timeout_seconds} s:\n{self.logs()}"
        )

    def run_logs(self, run_id: str) -> str:
        body = {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200, "sort": "TIMESTAMP_ASC"}
        return "\n".join(entry["message"] for entry in self.post("logs/filter", body))

    def task_runs(self, run_id: str) -> list[dict[str, Any]]:
        body = {"flow_runs": {"id": {"any_": [run_id]}}, "limit": 200}
        found: list[dict[str, Any]] = self.post("task_runs/filter", body)
        return found

    def artifacts(self, run_id: str) -> list[dict[str, Any]]:
        body = {"artifacts": {"flow_run_id": {"any_": [run_id]}}}
        found: list[dict[str, Any]] = self.post("artifacts/filter", body)
        return found

    # -- teardown ----------------------------------------------------------------------------

    def logs(self, tail_chars: int = 6000) -> str:
        parts = []
        for _, log in self.processes:
            text = log.read_text(errors="replace") if log.exists() else ""
            parts.append(f"--- {log.name} (last {tail_chars} chars) ---\n{text[-tail_chars:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        self.http.close()
        for process, _ in reversed(self.processes):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait(10)


class OutageProxy(SlowProxy):
    """A loopback TCP forwarder in front of the S3 server that, while `down`, drops every new
    connection at once: the store is unreachable, as in an outage, and back when it ends."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port, bytes_per_second=1e12, latency_seconds=0.0)
        self.down = threading.Event()

    def outage(self, seconds: float) -> None:
        self.down.set()
        threading.Timer(seconds, self.down.clear).start()

    def refuses(self) -> bool:
        return self.down.is_set()


class Webhook:
    """A loopback HTTP endpoint that keeps the JSON body of every POST (what a Slack-style
    incoming webhook would receive from the server's notification action)."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802  (http.server's name)
                length = int(self.headers.get("Content-Length") or 0)
                received.append(json.loads(self.rfile.read(length) or b"{}"))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:  # no stderr line per request
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, text: str, timeout_seconds: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            for body in list(self.received):
                if text in json.dumps(body):
                    return body
            time.sleep(0.5)
        return None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
