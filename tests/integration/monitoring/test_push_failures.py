"""A Pushgateway that is down or hangs never crashes or stalls training (issue 4).

Both failure modes are real sockets on 127.0.0.1: a port nobody listens on, and a server that
accepts connections and never answers. Training runs a real ``Trainer.fit``.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import pytest

from lightning_fragrance.examples.toy import ToyPolicyModule, toy_dataloader
from lightning_fragrance.loggers import PrometheusLogger
from lightning_fragrance.monitoring.servers import free_port

pytestmark = pytest.mark.integration


class SilentServer:
    """Accepts TCP connections and never sends a byte (a hung gateway)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted_at: list[float] = []
        self.connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            self.accepted_at.append(time.monotonic())
            self.connections.append(connection)  # held open, never answered

    def close(self) -> None:
        for connection in self.connections:
            connection.close()
        self.sock.close()


class TrickleServer:
    """Reads a request, then answers one byte every 1.5 s (a gateway that is alive but stalled).

    Each byte arrives well within a 2 s socket timeout, so only a total deadline ends the push.
    """

    ANSWER = b"HTTP/1.1 200 OK\r\nX-Stalled: " + b"a" * 200

    def __init__(self, interval: float = 1.5) -> None:
        self.interval = interval
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.bytes_sent = 0
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._trickle, args=(connection,), daemon=True).start()

    def _trickle(self, connection: socket.socket) -> None:
        with connection:
            connection.recv(65536)  # the request (headers and a small body)
            for byte in self.ANSWER:
                try:
                    connection.sendall(bytes([byte]))
                except OSError:  # the client gave up and closed
                    return
                self.bytes_sent += 1
                if self.closed.wait(self.interval):
                    return

    def close(self) -> None:
        self.closed.set()
        self.sock.close()


class StepClock(pl.Callback):
    """Records when each training step ended (monotonic clock)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, *args: Any) -> None:
        self.ends.append(time.monotonic())


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


def _fit(logger: PrometheusLogger, steps: int, clock: StepClock) -> None:
    trainer = pl.Trainer(
        max_steps=steps,
        logger=logger,
        callbacks=[clock],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(ToyPolicyModule(), toy_dataloader(n=1024))


def test_training_keeps_stepping_while_a_push_hangs_and_errors_are_counted(
    silent_server: SilentServer,
) -> None:
    logger = PrometheusLogger(
        pushgateway_url=f"127.0.0.1:{silent_server.port}", push_interval=0.0, push_timeout=1.0
    )
    clock = StepClock()
    _fit(logger, steps=60, clock=clock)

    assert len(clock.ends) == 60  # fit completed: nothing crashed
    assert silent_server.accepted_at, "the logger never tried to push"
    hung_from = silent_server.accepted_at[0]  # the first push connected, then got no answer
    hung_until = hung_from + logger.push_timeout
    # The training thread kept stepping while that push hung for its whole timeout.
    assert [t for t in clock.ends if hung_from < t < hung_until]
    assert len([t for t in clock.ends if t > hung_from]) >= 20
    assert logger.push_errors >= 1  # every hung push timed out and was counted
    assert logger.pushes_done == 0


def test_training_completes_when_the_gateway_is_down_and_errors_are_counted() -> None:
    port = free_port()  # nothing listens here: connection refused
    logger = PrometheusLogger(
        pushgateway_url=f"127.0.0.1:{port}", push_interval=0.0, push_timeout=0.5
    )
    clock = StepClock()
    _fit(logger, steps=20, clock=clock)

    assert len(clock.ends) == 20
    assert logger.push_errors >= 2  # at least one push while training and the final one
    assert logger.pushes_done == 0
    assert logger.registry.get_sample_value("rl_global_step") == 19.0  # metrics still recorded


@pytest.fixture
def trickle_server() -> Iterator[TrickleServer]:
    server = TrickleServer(interval=1.5)
    yield server
    server.close()


def test_a_gateway_trickling_a_byte_every_1_5_s_counts_as_a_push_error_at_the_deadline(
    trickle_server: TrickleServer,
) -> None:
    logger = PrometheusLogger(
        pushgateway_url=f"127.0.0.1:{trickle_server.port}", push_interval=0.0, push_timeout=2.0
    )
    logger.log_metrics({"train/reward": 1.0}, step=0)  # requests a push
    # Without a total deadline the push would last as long as the trickle (minutes): wait
    # up to 10 s for it to be counted as failed.
    give_up = time.monotonic() + 10.0
    while logger.push_errors < 1 and time.monotonic() < give_up:
        time.sleep(0.05)

    assert logger.push_errors == 1  # counted, so PrometheusLoggerPushFailing can fire
    assert logger.pushes_done == 0
    assert trickle_server.bytes_sent >= 1  # the gateway was answering, just too slowly
    logger.finalize("success")  # bounded too: its final push also meets the deadline
    assert logger.push_errors == 2
