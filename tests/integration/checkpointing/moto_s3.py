"""A real S3-protocol server on 127.0.0.1 for the object-store tests: moto in server mode.

moto stands in for S3 (or MinIO, GCS's S3 API...): it speaks the S3 REST protocol over HTTP,
and the code under test reaches it exactly as it would reach S3, through fsspec and s3fs with
an endpoint URL and credentials. The server is a separate process, started on a free port and
stopped by its PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

START_TIMEOUT_S = 60.0
ACCESS_KEY = "testing"  # moto accepts any credentials; S3 would check them
SECRET_KEY = "testing"
REGION = "us-east-1"


def require_moto() -> None:
    """Skip without moto on a developer's machine; fail on CI, where `make test` installs it
    (the dev extra), so the object-store tests can never silently stop running."""
    try:
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError as err:
        message = (
            f"{err.name} is missing: the object-store tests need moto[server] and s3fs "
            "(pip install -e '.[dev]', or make test)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message, allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with status {proc.returncode} at start")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"moto server not listening on 127.0.0.1:{port} after {START_TIMEOUT_S}s")


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """Run ``python -m moto.server`` on a free loopback port; yields its endpoint URL."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_until_listening(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def client_environment(endpoint: str) -> dict[str, str]:
    """The settings every S3 client here reads (boto3, s3fs, Lightning's ckpt_path loading):
    the endpoint, credentials and region, as a user would export them for S3 or MinIO."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
    }


@contextlib.contextmanager
def s3_session() -> Iterator[str]:
    """A moto server with its settings in this process's environment, as a user would export
    them, so every client (s3fs, boto3, Lightning's ckpt_path loading, child processes that
    inherit the environment) reaches it; yields the endpoint. The environment and fsspec's
    client cache are restored afterwards."""
    import s3fs

    with moto_server() as endpoint:
        settings = client_environment(endpoint)
        saved = {name: os.environ.get(name) for name in settings}
        os.environ.update(settings)
        s3fs.S3FileSystem.clear_instance_cache()  # fsspec caches clients by their arguments
        try:
            yield endpoint
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def observer_client() -> Any:
    """A separate s3fs client with no listing cache: what another machine would see."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def new_bucket() -> str:
    """Create a bucket with a fresh name on the session's server; its name."""
    name = f"lf-{uuid.uuid4().hex[:12]}"
    observer_client().mkdir(name)
    return name


class SeverableProxy:
    """A TCP forwarder on 127.0.0.1 in front of the S3 server that can cut the network.

    `sever_after(n)` lets ``n`` more bytes of requests through, then closes every connection
    and refuses new ones until `heal`: an upload that loses its network midway, while the
    server (and what it already stored) stays up.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._budget: int | None = None  # None: healthy; else request bytes left before the cut
        self._severed = False
        self._sockets: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def sever_after(self, nbytes: int) -> None:
        with self._lock:
            self._budget = nbytes

    def heal(self) -> None:
        with self._lock:
            self._budget, self._severed = None, False

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self._cut()

    def _cut(self) -> None:
        with self._lock:
            self._severed = True
            sockets, self._sockets = list(self._sockets), set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                severed = self._severed
            if severed:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._sockets.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, request: bool) -> None:
        try:
            while data := source.recv(65536):
                if request and self._spend(len(data)):
                    self._cut()
                    return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def _spend(self, nbytes: int) -> bool:
        """Whether forwarding ``nbytes`` more request bytes crosses the armed budget."""
        with self._lock:
            if self._budget is None:
                return False
            self._budget -= nbytes
            return self._budget < 0


def severable_client() -> tuple[SeverableProxy, Any]:
    """A proxy in front of this session's server and an s3fs client that goes through it with
    explicit settings (the storage_options a user passes) and no retries, so a cut connection
    is an error at once."""
    import s3fs

    proxy = SeverableProxy(int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
    fs = s3fs.S3FileSystem(
        endpoint_url=proxy.endpoint,
        key=ACCESS_KEY,
        secret=SECRET_KEY,
        skip_instance_cache=True,
        config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 10},
    )
    fs.retries = 1
    return proxy, fs
