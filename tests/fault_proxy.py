"""A TCP proxy for tests that break connections on cue: it sits between a client and a real HTTP server,
records every request's head, and for a request matching an armed fault it can

- ``drop``: forward the request, wait until the server has answered it (so the server did the work), then
  close the client's connection without passing the answer on;
- ``cut``: pass the answer on up to ``after_bytes`` bytes, or up to the ``count``-th occurrence of ``pattern``,
  then close;
- ``respond``: answer with ``canned`` bytes itself, without reaching the server.

Each fault fires ``times`` times (on separate requests), then the proxy passes everything through again."""

from __future__ import annotations

import re
import select
import socket
import threading
from dataclasses import dataclass, field

HEAD_END = b"\r\n\r\n"


@dataclass
class Fault:
    match: bytes  # a substring of the request head (request line and headers), in any case
    action: str  # drop | cut | respond
    after_bytes: int | None = None
    pattern: bytes | None = None
    count: int = 1
    canned: bytes = b""
    times: int = 1
    fired: int = 0
    done: threading.Event = field(default_factory=threading.Event)


class _Active:
    def __init__(self, fault: Fault) -> None:
        self.fault = fault
        self.sent = 0
        self.seen = b""


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.port = self.server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.heads: list[bytes] = []
        self.faults: list[Fault] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, match: str | bytes, action: str, **kw: object) -> Fault:
        f = Fault(match.encode() if isinstance(match, str) else match, action, **kw)  # type: ignore[arg-type]
        with self.lock:
            self.faults.append(f)
        return f

    def requests(self, match: str | bytes = b"") -> list[str]:
        """Recorded request heads containing ``match`` (in any case), decoded."""
        m = (match.encode() if isinstance(match, str) else match).lower()
        with self.lock:
            return [h.decode("latin-1") for h in self.heads if m in h.lower()]

    def close(self) -> None:
        self.closed = True
        self.server.close()

    def _fault_for(self, head: bytes) -> Fault | None:
        with self.lock:
            self.heads.append(head)
            for f in self.faults:
                if f.fired < f.times and f.match.lower() in head.lower():
                    f.fired += 1
                    return f
        return None

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        pending = b""  # client bytes not yet forwarded (a head being read)
        body_left = 0  # bytes of the current request's body still to forward
        passthrough = False  # a chunked request body: no more head parsing on this connection
        active: _Active | None = None
        try:
            while True:
                readable, _, _ = select.select([client, upstream], [], [], 30)
                if not readable:
                    continue
                if client in readable:
                    data = client.recv(65536)
                    if not data:
                        return
                    if passthrough:
                        upstream.sendall(data)
                    else:
                        pending += data
                        while pending:
                            if body_left:
                                n = min(body_left, len(pending))
                                upstream.sendall(pending[:n])
                                pending, body_left = pending[n:], body_left - n
                                continue
                            end = pending.find(HEAD_END)
                            if end < 0:
                                break
                            head, pending = pending[: end + 4], pending[end + 4 :]
                            fault = self._fault_for(head)
                            if fault is not None and fault.action == "respond":
                                client.sendall(fault.canned)
                                fault.done.set()
                                return
                            if fault is not None:
                                active = _Active(fault)
                            upstream.sendall(head)
                            m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                            body_left = int(m.group(1)) if m else 0
                            if re.search(rb"(?im)^transfer-encoding:\s*chunked", head):
                                passthrough = True
                                upstream.sendall(pending)
                                pending = b""
                if upstream in readable:
                    data = upstream.recv(65536)
                    if not data:
                        return
                    if active is None:
                        client.sendall(data)
                        continue
                    f = active.fault
                    if f.action == "drop":  # the server answered: the client never hears it
                        f.done.set()
                        return
                    limit = f.after_bytes
                    if f.pattern is not None:
                        active.seen += data
                        found, start = 0, 0
                        while True:
                            i = active.seen.find(f.pattern, start)
                            if i < 0:
                                break
                            found, start = found + 1, i + len(f.pattern)
                            if found == f.count:
                                limit = start
                                break
                    if limit is not None and active.sent + len(data) >= limit:
                        client.sendall(data[: max(0, limit - active.sent)])
                        f.done.set()
                        return
                    client.sendall(data)
                    active.sent += len(data)
        except OSError:
            return
        finally:
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
