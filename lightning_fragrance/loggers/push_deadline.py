"""Pushgateway requests bounded by one total deadline, not only by a per-read socket timeout.

prometheus_client's default handler gives each socket operation ``timeout`` seconds. A gateway
that trickles one byte every 1.5 s under a 2 s timeout therefore keeps a push alive for as long
as it likes, and the push never counts as an error, so ``PrometheusLoggerPushFailing`` never
fires (issue 10, item 14). ``deadline_handler`` is a drop-in ``handler=`` for
``push_to_gateway`` / ``delete_from_gateway``: a watchdog shuts the connection's socket down when
the deadline passes, the blocked read fails, and the request raises ``PushDeadlineExceeded``.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import urllib.parse
from collections.abc import Callable, Sequence

Handler = Callable[[str, str, float | None, Sequence[tuple[str, str]], bytes], Callable[[], None]]


class PushDeadlineExceeded(TimeoutError):
    """A request to the Pushgateway did not complete within its total deadline."""


def deadline_handler(deadline_s: float) -> Handler:
    """A prometheus_client push handler whose requests end, one way or another, in
    ``deadline_s`` seconds: connect, send and the whole answer included.

    Raises:
        ValueError: A deadline that is not positive.
    """
    if not deadline_s > 0:
        raise ValueError(f"deadline_s must be > 0 seconds, got {deadline_s}")

    def handler(
        url: str,
        method: str,
        timeout: float | None,
        headers: Sequence[tuple[str, str]],
        data: bytes,
    ) -> Callable[[], None]:
        # `timeout` (prometheus_client's per-operation one) is superseded by the deadline.
        return lambda: request_within(url, method, headers, data, deadline_s)

    return handler


def request_within(
    url: str, method: str, headers: Sequence[tuple[str, str]], data: bytes, deadline_s: float
) -> None:
    """Send one HTTP request and read its whole answer within ``deadline_s`` seconds.

    Raises:
        PushDeadlineExceeded: The deadline passed first.
        OSError: The connection failed, or the gateway answered with a status >= 400.
    """
    parts = urllib.parse.urlsplit(url)
    connection_type = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    connection = connection_type(parts.hostname or "", parts.port, timeout=deadline_s)
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        sock = connection.sock
        if sock is not None:  # None while connecting: checked right after connect() below
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    watchdog = threading.Timer(deadline_s, expire)
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.connect()
        if expired.is_set():
            raise PushDeadlineExceeded(f"{method} {url}: no connection within {deadline_s:g} s")
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        connection.request(method, path, body=data, headers=dict(headers))
        response = connection.getresponse()
        response.read()
    except (OSError, http.client.HTTPException) as exc:
        if expired.is_set():
            raise PushDeadlineExceeded(
                f"{method} {url} did not complete within {deadline_s:g} s (the gateway is too "
                f"slow or stalled)"
            ) from exc
        raise
    finally:
        watchdog.cancel()
        connection.close()
    if response.status >= 400:
        raise OSError(f"error talking to pushgateway: {response.status} {response.reason}")
