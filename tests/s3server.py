"""A real S3-compatible server on loopback for the tests: moto in server mode, as a subprocess (so
a test can kill it and start it again on the same port), and a throttling TCP proxy for the
slow-network case. Nothing listens or connects beyond 127.0.0.1."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HOST = "127.0.0.1"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class MotoServer:
    """`python -m moto.server` on a fixed loopback port; restartable (moto then starts empty)."""

    def __init__(self, port: int | None = None, log: Path | None = None) -> None:
        self.port = port or free_port()
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)],
            stdout=out,
            stderr=out,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.process.returncode}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 0.2):
                return
            time.sleep(0.05)
        raise RuntimeError(f"moto server did not listen on {self.endpoint} in {timeout}s")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def restart(self, down_seconds: float = 0.0) -> None:
        self.kill()
        time.sleep(down_seconds)
        self.start()


class SlowProxy:
    """Forwards loopback TCP to `target_port`, delaying each chunk and capping the byte rate,
    in both directions: a slow, high-latency network in front of the store."""

    def __init__(
        self, target_port: int, bytes_per_second: float = 4e6, latency_seconds: float = 0.01
    ) -> None:
        self.target_port = target_port
        self.rate = bytes_per_second
        self.latency = latency_seconds
        self.listener = socket.create_server((HOST, 0))
        self.port = int(self.listener.getsockname()[1])
        self.closed = threading.Event()
        self.bytes = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def refuses(self) -> bool:
        """Whether a new connection is reset at once (an outage, in a subclass)."""
        return False

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refuses():
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()  # a reset: the connection is refused mid-handshake
                continue
            upstream = socket.create_connection((HOST, self.target_port))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self.closed.is_set():
                data = src.recv(64 * 1024)
                if not data:
                    break
                time.sleep(self.latency + len(data) / self.rate)
                self.bytes += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.closed.set()
        self.listener.close()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(log=tmp_path_factory.mktemp("moto") / "moto.log")
    server.start()
    yield server
    server.kill()


def use_endpoint(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Point s3fs (through the standard AWS variables) at `endpoint` for one test."""
    from s3fs import S3FileSystem

    for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoServer]:
    """The session's server, with this test's environment pointing at it."""
    from s3fs import S3FileSystem

    use_endpoint(monkeypatch, moto_server.endpoint)
    yield moto_server
    S3FileSystem.clear_instance_cache()


def make_bucket(name: str) -> None:
    from s3fs import S3FileSystem

    fs = S3FileSystem(skip_instance_cache=True)
    with contextlib.suppress(FileExistsError):
        fs.mkdir(name)


def subprocess_env(endpoint: str) -> dict[str, str]:
    return {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}


@pytest.fixture
def bucket(s3: MotoServer) -> str:
    """A fresh bucket on the loopback server, one per test."""
    name = f"b-{uuid.uuid4().hex[:12]}"
    make_bucket(name)
    return name


def fs() -> Any:
    """An s3fs file system that sees every write at once (no instance or listing cache)."""
    from s3fs import S3FileSystem

    return S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def assert_published_as_manifest_says(prefix: str) -> dict[str, Any]:
    """The published prefix holds exactly the manifest's files, each with its size and sha256."""
    s3 = fs()
    manifest = json.loads(s3.cat(f"{prefix}/manifest.json"))
    names = {p.rsplit("/", 1)[1] for p in s3.find(prefix)}
    assert names == {*manifest["files"], "manifest.json", "_SUCCESS"}
    for name, entry in manifest["files"].items():
        data = s3.cat(f"{prefix}/{name}")
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    return dict(manifest)
