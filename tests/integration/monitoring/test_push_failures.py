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
