"""One webhook request, to an address that was checked: the connection is pinned to it.

``PinnedBackend`` is an httpcore network backend whose ``connect_tcp`` resolves the host itself, checks every
address (``core.webhooks.addresses``) and connects to a checked one, so a name that resolves to a public
address when checked and to a private one when connected (DNS rebinding) gets nowhere. TLS still verifies
the certificate for, and sends SNI with, the URL's host name (httpcore takes them from the URL, not from the
socket), and the ``Host`` header is the URL's.

Bounds: connecting takes at most the connect timeout, the whole request at most the total timeout (every
read and write is cut to what is left of it), no redirect is followed (httpcore never follows one: a 3xx is
just a failed attempt), no proxy from the environment is used, and at most ``RESPONSE_PREFIX_BYTES`` of the
answer's body are read (each socket read is capped, so little more ever reaches memory).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpcore

from core.webhooks.addresses import AddressRefused, checked_addresses, parse_url

RESPONSE_PREFIX_BYTES = 1024
READ_CHUNK = 4096  # at most this much per socket read
MAX_READ_BYTES = 64 * 1024  # status line + headers + the body prefix; a longer answer is cut off
USER_AGENT = "secateurs-webhooks/1"


class BlockedAddress(httpcore.ConnectError):
    """The host resolved to an address webhooks may not reach."""


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def left(self, timeout: float | None, error: type[Exception]) -> float:
        rest = self.at - time.monotonic()
        if rest <= 0:
            raise error("the delivery ran out of time")
        return rest if timeout is None else min(timeout, rest)


class _BoundedStream(httpcore.NetworkStream):
    """A stream whose reads and writes end by the deadline, and which reads at most ``MAX_READ_BYTES``."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: _Deadline) -> None:
        self.inner, self.deadline, self.read_bytes = inner, deadline, 0

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data = self.inner.read(min(max_bytes, READ_CHUNK), self.deadline.left(timeout, httpcore.ReadTimeout))
        self.read_bytes += len(data)
        if self.read_bytes > MAX_READ_BYTES:
            raise httpcore.ReadError(f"the answer is longer than the {MAX_READ_BYTES} bytes read of it")
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.inner.write(buffer, self.deadline.left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self.inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        tls = self.inner.start_tls(ssl_context, server_hostname, self.deadline.left(timeout, httpcore.ConnectTimeout))
        return _BoundedStream(tls, self.deadline)

    def get_extra_info(self, info: str) -> Any:
        return self.inner.get_extra_info(info)


class PinnedBackend(httpcore.NetworkBackend):
    def __init__(self, *, allow_private: bool, connect_timeout: float, deadline: _Deadline) -> None:
        self.allow_private = allow_private
        self.connect_timeout = connect_timeout
        self.deadline = deadline
        self.inner = httpcore.SyncBackend()
        self.connected_to: str | None = None

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        budget = min(self.connect_timeout, timeout or self.connect_timeout)
        try:
            addresses = checked_addresses(
                host,
                port,
                allow_private=self.allow_private,
                timeout=self.deadline.left(budget, httpcore.ConnectTimeout),
            )
        except AddressRefused as e:
            raise BlockedAddress(str(e)) from None
        error: Exception | None = None
        for ip in addresses:  # each one was checked: connect to it, never to the name
            try:
                stream = self.inner.connect_tcp(
                    str(ip),
                    port,
                    timeout=self.deadline.left(budget, httpcore.ConnectTimeout),
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as e:
                error = e
                continue
            self.connected_to = str(ip)
            return _BoundedStream(stream, self.deadline)
        assert error is not None
        raise error

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise BlockedAddress("webhooks are never sent to a unix socket")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@dataclass
class Answer:
    """What one attempt got: the status and the start of the body, or the error that stopped it."""

    status: int | None = None
    body: bytes = b""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def post(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    allow_private: bool,
    require_https: bool,
    connect_timeout: float,
    total_timeout: float,
    ssl_context: ssl.SSLContext | None = None,
) -> Answer:
    """POST ``body`` to ``url`` under every rule; never raises for what the receiver or the network did."""
    try:
        u = parse_url(url, require_https=require_https)
    except AddressRefused as e:
        return Answer(error=f"url refused: {e}")
    deadline = _Deadline(total_timeout)
    backend = PinnedBackend(allow_private=allow_private, connect_timeout=connect_timeout, deadline=deadline)
    request_headers = [
        ("Host", u.netloc.decode("ascii")),
        ("User-Agent", USER_AGENT),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        *headers.items(),
    ]
    timeouts = {"connect": connect_timeout, "read": total_timeout, "write": total_timeout, "pool": total_timeout}
    answer = Answer()
    try:
        with httpcore.ConnectionPool(
            ssl_context=ssl_context, network_backend=backend, max_connections=1, retries=0, http1=True, http2=False
        ) as pool:
            with pool.stream(
                "POST", str(u), headers=request_headers, content=body, extensions={"timeout": timeouts}
            ) as response:
                answer.status = response.status  # what decides the attempt; the body is only kept for the log
                prefix = bytearray()
                for chunk in response.iter_stream():
                    prefix += chunk
                    if len(prefix) >= RESPONSE_PREFIX_BYTES:
                        break
                answer.body = bytes(prefix[:RESPONSE_PREFIX_BYTES])
    except BlockedAddress as e:
        answer.error = f"address refused: {e}"
    except httpcore.TimeoutException as e:
        answer.error = f"timeout: {e or e.__class__.__name__}"
    except httpcore.ConnectError as e:
        answer.error = f"connection failed: {e or e.__class__.__name__}"
    except (httpcore.ProtocolError, httpcore.NetworkError, httpcore.UnsupportedProtocol, OSError, ssl.SSLError) as e:
        answer.error = f"{e.__class__.__name__}: {e}"
    return answer
