"""API under load: idle SSE followers, event delivery to many followers, job-create throughput.

    python bench/api_load.py [--followers 0,100,1000,2000] [--workers 1,2] [--delivery-followers 1000]
                             [--events 10] [--concurrency 1,8,32] [--creates 200] [--parts idle,delivery,create]
                             [--sse-client raw|httpx] [--py-spy DIR]

For each ``--workers`` value the script starts the real API (``python -m cli service api --workers N``) on a
fresh, migrated Postgres database (created for the run, dropped after it) with Redis as the broker (a queue
of its own). This process is the load generator, in a process of its own: one asyncio event loop, httpx for
the requests, and (by default) a bare asyncio protocol for the SSE followers. No worker runs.

1. idle: N followers of one queued job sit idle; an unrelated GET /v1/pruning-jobs/{id} is timed
   ``--gets`` times, one after the other; then database transactions per second are counted over
   ``--window`` seconds from pg_stat_database and from the API's ``secateurs_db_transactions_total``.
2. delivery: ``--delivery-followers`` clients follow one running job; this process commits ``--events``
   worker-side events (``core.jobs.execution.report``, its own transaction each) and times, for every
   follower, from the commit's return to the event's ``id:`` line read off the stream.
3. create: POST /v1/pruning-jobs from 1 / 8 / 32 concurrent clients (jobs/s, p50/p99).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import psutil
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECRET = "api-load-secret"
BODY = {
    "model": "meta-llama/Llama-3.2-1B",
    "method": "wanda",
    "sparsity": 0.5,
    "calibration": {"source": "c4", "nsamples": 128, "seqlen": 2048},
    "metadata": {"bench": "api_load"},
}


def raise_nofile(n: int = 65536) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n if hard == resource.RLIM_INFINITY else min(n, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def table(head: list[str], rows: list[list[str]]) -> str:
    w = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w[i]) for i, c in enumerate(cells))  # noqa: E731
    return "\n".join([line(head), line(["-" * x for x in w]), *(line(r) for r in rows)])


# --- Postgres -----------------------------------------------------------------------------------------


class Pg:
    """The throw-away database, and the admin connection (to the URL's own database, so our reads of
    pg_stat_database are no transactions of the bench database)."""

    def __init__(self, url: str) -> None:
        u = urlparse(url.replace("+psycopg", ""))
        self.admin_args: dict[str, Any] = dict(
            host=u.hostname,
            port=u.port or 5432,
            user=u.username or "postgres",
            password=u.password,
            dbname=u.path.lstrip("/") or "postgres",
        )
        self.admin = psycopg.connect(**self.admin_args, autocommit=True)
        self.name = f"secateurs_load_{uuid.uuid4().hex[:8]}"
        self.admin.execute(f'CREATE DATABASE "{self.name}"')
        self.url = urlparse(url)._replace(path="/" + self.name).geturl()
        self.probe: psycopg.Connection[Any] | None = None

    def maintenance(self) -> int:
        """Autovacuum and autoanalyze runs so far on the bench database's tables. Read on a connection to the
        bench database (its own transactions are flushed at once: pg_stat_force_next_flush), outside the
        window whose transactions are counted."""
        if self.probe is None:
            self.probe = psycopg.connect(**{**self.admin_args, "dbname": self.name}, autocommit=True)
        row = self.probe.execute(
            "SELECT coalesce(sum(autovacuum_count + autoanalyze_count), 0), pg_stat_force_next_flush() "
            "FROM pg_stat_user_tables"
        ).fetchone()
        assert row is not None
        return int(row[0])

    def xacts(self) -> int:
        """xact_commit + xact_rollback of the bench database (every backend's, as flushed so far)."""
        row = self.admin.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s", (self.name,)
        ).fetchone()
        assert row is not None
        return int(row[0])

    async def watch(self, seconds: float) -> dict[str, int]:
        """Poll pg_stat_activity of the bench database every 0.2 s for ``seconds``: what its backends did
        (state changes by backend type and query; quick ones in between polls are missed), and autovacuum
        workers seen. Read on the admin connection, so it adds no transaction to the bench database."""
        last: dict[int, Any] = {}
        seen: dict[str, int] = {}
        end = time.monotonic() + seconds
        first = True
        while True:
            rows = self.admin.execute(
                "SELECT pid, backend_type, state_change, left(query, 40) FROM pg_stat_activity WHERE datname = %s",
                (self.name,),
            ).fetchall()
            for pid, kind, changed, query in rows:
                if kind == "autovacuum worker" and pid not in last:
                    seen["autovacuum worker"] = seen.get("autovacuum worker", 0) + 1
                elif not first and pid in last and changed != last[pid]:
                    k = f"{kind}: {' '.join((query or '').split())}"
                    seen[k] = seen.get(k, 0) + 1
                last[pid] = changed
            first = False
            left = end - time.monotonic()
            if left <= 0:
                return seen
            await asyncio.sleep(min(0.2, left))

    def waits(self, stop: threading.Event) -> dict[str, int]:
        """Until ``stop``: sample (every 20 ms) what the bench database's active backends wait on. Run in a
        thread, on a connection of its own, so that the load generator's event loop never waits for it."""
        out: dict[str, int] = {}
        with psycopg.connect(**self.admin_args, autocommit=True) as conn:
            while not stop.wait(0.02):
                for kind, event in conn.execute(
                    "SELECT wait_event_type, wait_event FROM pg_stat_activity "
                    "WHERE datname = %s AND state = 'active' AND backend_type = 'client backend'",
                    (self.name,),
                ).fetchall():
                    k = f"{kind}:{event}" if kind else "CPU"
                    out[k] = out.get(k, 0) + 1
        return out

    def drop(self) -> None:
        if self.probe is not None:
            self.probe.close()
        self.admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        self.admin.close()


# --- the API server -----------------------------------------------------------------------------------

METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) ([0-9.eE+-]+|NaN|[+-]Inf)$", re.M)


def parse_metrics(text: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in METRIC.finditer(text)}


@dataclass
class Server:
    base: str
    workers: int
    proc: subprocess.Popen[bytes]
    log: Path
    db: str
    tenant: str
    headers: dict[str, str]
    scrape_cost: float = 1.0  # API transactions one /metrics scrape adds (measured at start)
    scraper: httpx.AsyncClient | None = None

    def processes(self) -> list[psutil.Process]:
        try:
            p = psutil.Process(self.proc.pid)
            return [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu(self) -> float:
        total = 0.0
        for p in self.processes():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def threads(self) -> list[int]:
        out = []
        for p in self.processes():
            try:
                out.append(p.num_threads())
            except psutil.NoSuchProcess:
                pass
        return out

    async def scrape_all(self, keep: str = "first") -> dict[float, dict[str, float]]:
        """/metrics of every API process, keyed by its counter's creation time (one per process): each
        scrape on a fresh connection, until every process has answered. A process may answer more than
        once (each scrape costs it ``scrape_cost`` transactions): ``keep`` its first or its last answer."""
        seen: dict[float, dict[str, float]] = {}
        if self.scraper is None:  # no keep-alive: each scrape is a new connection, which any process may take
            self.scraper = httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_keepalive_connections=0))
        for _ in range(40 * self.workers):
            m = parse_metrics((await self.scraper.get(self.base + "/metrics")).text)
            key = m["secateurs_db_transactions_created"]
            if keep == "last" or key not in seen:
                seen[key] = m
            if len(seen) >= self.workers:
                return seen
        raise RuntimeError(f"only {len(seen)} of {self.workers} API processes answered /metrics")

    def errors_in_log(self) -> list[str]:
        text = self.log.read_text(errors="replace")
        return [ln for ln in text.splitlines() if "Traceback" in ln or " ERROR" in ln or "ERROR:" in ln]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def start_server(db: str, redis_url: str, queue: str, workers: int, cap: int, logdir: Path) -> Server:
    from core.auth import create_key, create_tenant
    from core.db.engine import session_scope
    from core.settings import Settings

    with session_scope(db) as s:
        tenant = create_tenant(s, f"load-{uuid.uuid4().hex[:6]}").id
        _, key = create_key(s, tenant, Settings(_env_file=None, secret_key=SECRET).pepper)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECATEURS_")}
    env.update(
        SECATEURS_ENV="test",
        SECATEURS_DATA_DIR=str(logdir / "var"),
        SECATEURS_DATABASE_URL=db,
        SECATEURS_BROKER_URL=redis_url,
        SECATEURS_QUEUE=queue,
        SECATEURS_SECRET_KEY=SECRET,
        SECATEURS_SSE_MAX_STREAMS_PER_TENANT=str(cap),
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    port = free_port()
    log = logdir / f"api-w{workers}-{port}.log"
    cmd = [sys.executable, "-m", "cli", "service", "api", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", str(workers), "--no-migrate"]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=open(log, "wb"),  # noqa: SIM115  (the child owns it)
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=raise_nofile,
    )
    srv = Server(f"http://127.0.0.1:{port}", workers, proc, log, db, tenant, {"Authorization": f"Bearer {key}"})
    deadline = time.monotonic() + 90
    while True:
        try:
            async with httpx.AsyncClient(timeout=2) as c:
                if (await c.get(srv.base + "/readyz")).status_code == 200:
                    break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the API did not start:\n" + log.read_text()[-3000:])
        await asyncio.sleep(0.2)
    await srv.scrape_all()  # every process is up
    # what one scrape costs in API transactions: two scrapes on one keep-alive connection (one process)
    async with httpx.AsyncClient(base_url=srv.base, timeout=30) as c:
        a = parse_metrics((await c.get("/metrics")).text)["secateurs_db_transactions_total"]
        b = parse_metrics((await c.get("/metrics")).text)["secateurs_db_transactions_total"]
    srv.scrape_cost = b - a
    return srv


def stop_server(srv: Server) -> None:
    srv.scraper = None  # its connections are gone with the server
    try:
        os.killpg(srv.proc.pid, signal.SIGTERM)
        srv.proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(10)
    except ProcessLookupError:
        pass


async def new_job(c: httpx.AsyncClient) -> str:
    r = await c.post("/v1/pruning-jobs", json=BODY)
    assert r.status_code == 201, r.text
    return r.json()["id"]


# --- CPU accounting -------------------------------------------------------------------------------------


def pg_backends_cpu(dbname: str) -> dict[int, float]:
    """CPU seconds of each Postgres backend connected to the bench database (its process title names it)."""
    out: dict[int, float] = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            cl = " ".join(p.info["cmdline"] or [])
            if cl.startswith("postgres:") and f" {dbname} " in cl:
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


@dataclass
class CpuMark:
    wall: float
    api: float
    bench: float
    pg: dict[int, float]


@contextmanager
def cpu_use(srv: Server, dbname: str, out: dict[str, Any]) -> Iterator[None]:
    """Fills ``out`` with the API's, this process's and the bench database's Postgres backends' CPU use."""
    me = psutil.Process()
    t = me.cpu_times()
    a = CpuMark(time.monotonic(), srv.cpu(), t.user + t.system, pg_backends_cpu(dbname))
    yield
    t = me.cpu_times()
    b = CpuMark(time.monotonic(), srv.cpu(), t.user + t.system, pg_backends_cpu(dbname))
    wall = b.wall - a.wall
    out.update(
        wall=wall,
        api_cores=(b.api - a.api) / wall,
        bench_cores=(b.bench - a.bench) / wall,
        # backends that ended meanwhile are missed: a lower bound when the pool shrank
        pg_cores=sum(v - a.pg.get(pid, 0.0) for pid, v in b.pg.items()) / wall,
        api_threads=srv.threads(),
        bench_threads=me.num_threads(),
    )


@contextmanager
def profiled(srv: Server, a: argparse.Namespace, tag: str) -> Iterator[None]:
    """With ``--py-spy DIR``: py-spy records every API process meanwhile (raw collapsed stacks, DIR/<tag>-<pid>.txt)."""
    if not a.py_spy:
        yield
        return
    Path(a.py_spy).mkdir(parents=True, exist_ok=True)
    pids = [p.pid for p in srv.processes() if "resource_tracker" not in " ".join(p.cmdline())]
    spies = [
        subprocess.Popen(
            ["py-spy", "record", "-p", str(pid), "-r", "250", "--format", "raw", "--nonblocking", "-o"]
            + [str(Path(a.py_spy) / f"w{srv.workers}-{tag}-{pid}.txt")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for pid in pids
    ]
    time.sleep(1.0)  # attached
    try:
        yield
    finally:
        for sp in spies:
            sp.send_signal(signal.SIGINT)
        for sp in spies:
            sp.wait(30)


def cpu_note(c: dict[str, Any]) -> str:
    return (
        f"cores busy: API {c['api_cores']:.2f} ({len(c['api_threads'])} processes, threads {c['api_threads']}), "
        f"load generator {c['bench_cores']:.2f} ({c['bench_threads']} threads), "
        f"Postgres backends of the bench db {c['pg_cores']:.2f}"
    )


# --- followers ---------------------------------------------------------------------------------------


@dataclass(eq=False)
class Follower:
    """One SSE client: the time (perf_counter) each event id arrived; ended / error if the stream stopped."""

    seen: dict[int, float] = field(default_factory=dict)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    status: int | None = None
    ended: bool = False
    error: str | None = None

    def line(self, line: str, now: float) -> None:
        if line.startswith("id: "):
            self.seen[int(line[4:])] = now
        elif line.startswith("retry:"):
            self.connected.set()


class HttpxFollower(Follower):
    async def run(self, crowd: Crowd) -> None:
        assert crowd.client is not None
        try:
            async with crowd.client.stream("GET", crowd.url, headers=crowd.srv.headers) as r:
                self.status = r.status_code
                if r.status_code != 200:
                    await r.aread()
                    return
                async for line in r.aiter_lines():
                    self.line(line, time.perf_counter())
            self.ended = True
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001  (recorded and reported)
            self.error = f"{e.__class__.__name__}: {e}"
        finally:
            self.connected.set()


class RawFollower(Follower, asyncio.Protocol):
    """The same on a bare asyncio connection: HTTP/1.1, chunked body, SSE lines. An arrival is stamped in
    ``data_received``, before any parsing; its cost per event is a few microseconds, where httpx's stream
    reader spends ~100-200 µs (which, times 1,000 followers on a shared core, would be what is measured)."""

    def __init__(self) -> None:
        Follower.__init__(self)
        self.buf = b""
        self.text = ""
        self.head_done = False
        self.chunk: int | None = None  # bytes of the current chunk still to read, None: a size line is next
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    async def run(self, crowd: Crowd) -> None:
        u = urlparse(crowd.url)
        head = f"GET {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nAccept: text/event-stream\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in crowd.srv.headers.items()) + "\r\n"
        self.request = head.encode()
        try:
            await asyncio.get_running_loop().create_connection(lambda: self, u.hostname, u.port)
            await self.done
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            self.error = f"{e.__class__.__name__}: {e}"
        finally:
            if self.transport is not None:
                self.transport.close()
            self.connected.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended and self.error is None:
            self.error = f"connection lost: {exc!r}"
        if not self.done.done():
            self.done.set_result(None)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.buf += data
        if not self.head_done:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buf = self.buf[:end].decode("latin-1"), self.buf[end + 4 :]
            self.status = int(head.split(" ", 2)[1])
            self.head_done = True
            if self.status != 200 or "transfer-encoding: chunked" not in head.lower():
                self.connected.set()
                self._finish()
                return
        while True:
            if self.chunk is None:
                eol = self.buf.find(b"\r\n")
                if eol < 0:
                    return
                size = int(self.buf[:eol].split(b";")[0], 16)
                self.buf = self.buf[eol + 2 :]
                if size == 0:  # the server ended the stream
                    self.ended = True
                    self._finish()
                    return
                self.chunk = size
            if len(self.buf) < self.chunk + 2:
                return
            self.text += self.buf[: self.chunk].decode()
            self.buf, self.chunk = self.buf[self.chunk + 2 :], None
            *lines, self.text = self.text.split("\n")
            for ln in lines:
                self.line(ln, now)

    def _finish(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if not self.done.done():
            self.done.set_result(None)


class Crowd:
    """N followers of one job, connected at most ``ramp`` at a time."""

    def __init__(self, srv: Server, job_id: str, n: int, sse_client: str, ramp: int = 50) -> None:
        self.srv, self.n = srv, n
        self.url = f"{srv.base}/v1/pruning-jobs/{job_id}/events/stream"
        self.client: httpx.AsyncClient | None = None
        self.followers: list[HttpxFollower] | list[RawFollower]
        if sse_client == "httpx":
            limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=0)
            self.client = httpx.AsyncClient(timeout=httpx.Timeout(60, connect=30, read=None), limits=limits)
            self.followers = [HttpxFollower() for _ in range(n)]
        else:
            self.followers = [RawFollower() for _ in range(n)]
        self.tasks: list[asyncio.Task[None]] = []
        self.ramp = asyncio.Semaphore(ramp)

    async def _one(self, f: HttpxFollower | RawFollower) -> None:
        await self.ramp.acquire()
        released = False
        task = asyncio.create_task(f.run(self))
        try:
            await f.connected.wait()
            self.ramp.release()
            released = True
            await task
        finally:
            if not released:
                self.ramp.release()
            task.cancel()

    async def connect(self, expected_open: int) -> float:
        """Connect them all; wait until the servers count ``expected_open`` open streams. Returns seconds."""
        t0 = time.monotonic()
        self.tasks = [asyncio.create_task(self._one(f)) for f in self.followers]
        await asyncio.wait_for(asyncio.gather(*(f.connected.wait() for f in self.followers)), 300)
        bad = [f for f in self.followers if f.status != 200 or f.error]
        if bad:
            raise RuntimeError(f"{len(bad)} followers failed to connect: {bad[0].status} {bad[0].error}")
        deadline = time.monotonic() + 60
        while True:
            ms = await self.srv.scrape_all()
            if sum(m["secateurs_sse_streams_open"] for m in ms.values()) == expected_open:
                return time.monotonic() - t0
            if time.monotonic() > deadline:
                raise RuntimeError("the servers never counted every stream open")
            await asyncio.sleep(0.25)

    def dropped(self) -> list[Follower]:
        return [f for f in self.followers if f.ended or f.error]

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.client is not None:
            await self.client.aclose()


async def wait_streams_closed(srv: Server) -> None:
    deadline = time.monotonic() + 30
    while True:
        ms = await srv.scrape_all()
        if sum(m["secateurs_sse_streams_open"] for m in ms.values()) == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError("open streams never came back to 0")
        await asyncio.sleep(0.25)


# --- 1. idle followers --------------------------------------------------------------------------------


async def timed_gets(srv: Server, job_id: str, n: int) -> tuple[list[float], int]:
    """``n`` sequential GETs of one job on one keep-alive connection (after 10 untimed), and the non-200s."""
    lat, bad = [], 0
    async with httpx.AsyncClient(base_url=srv.base, headers=srv.headers, timeout=30) as c:
        for i in range(n + 10):
            t0 = time.perf_counter()
            r = await c.get(f"/v1/pruning-jobs/{job_id}")
            dt = time.perf_counter() - t0
            bad += r.status_code != 200
            if i >= 10:
                lat.append(dt)
    return lat, bad


async def idle_phase(srv: Server, pg: Pg, n: int, follow_job: str, get_job: str, a: argparse.Namespace) -> dict:
    crowd = Crowd(srv, follow_job, n, a.sse_client)
    row: dict[str, Any] = {"followers": n, "load": os.getloadavg()[0]}
    try:
        if n:  # the baseline just before, so that the ratio is not the machine's load changing between rows
            cpu: dict[str, Any] = {}
            with cpu_use(srv, pg.name, cpu):
                lat, bad = await timed_gets(srv, get_job, a.gets)
            row.update(base=lat, base_cpu=cpu)
            row["connect_s"] = await crowd.connect(n)
            await asyncio.sleep(2.0)  # the connect-time reads are done
        cpu = {}
        with profiled(srv, a, f"get-{n}"), cpu_use(srv, pg.name, cpu):
            lat, bad = await timed_gets(srv, get_job, a.gets)
        row.update(get=lat, get_non200=bad, get_cpu=cpu)
        if not n:
            row.update(base=lat, base_cpu=cpu, connect_s=0.0)
        # Transactions: nothing but the idle followers from here. A backend flushes its statistics at most
        # once a second, a busy one up to 10 s late: settle first, and no scrape inside the pg window.
        tm0 = time.monotonic()
        m0 = await srv.scrape_all(keep="last")
        await asyncio.sleep(a.settle)
        v0 = pg.maintenance()
        await asyncio.sleep(0.5)  # that read is flushed
        cpu = {}
        with cpu_use(srv, pg.name, cpu):
            t0, p0 = time.monotonic(), pg.xacts()
            row["pg_activity"] = await pg.watch(a.window)
            p1, t1 = pg.xacts(), time.monotonic()
        row["autovacuum"] = pg.maintenance() - v0
        m1 = await srv.scrape_all(keep="first")
        tm1 = time.monotonic()
        row["pg_tps"] = (p1 - p0) / (t1 - t0)
        # per process: counter delta minus the closing scrape's own transactions, over the scrapes' interval
        api = []
        for k, m in m1.items():
            if k in m0:
                d = m["secateurs_db_transactions_total"] - m0[k]["secateurs_db_transactions_total"]
                api.append((d - srv.scrape_cost) / (tm1 - tm0))
        row.update(api_tps=api, idle_cpu=cpu)
        row["dropped"] = len(crowd.dropped())
    finally:
        await crowd.close()
    await wait_streams_closed(srv)
    return row


# --- 2. event delivery --------------------------------------------------------------------------------


def hist_delta(
    m0: dict[float, dict[str, float]], m1: dict[float, dict[str, float]], name: str
) -> list[tuple[float, float]]:
    """Summed over processes: (upper bound, count in the window) of a histogram's cumulative buckets."""
    pat = re.compile(rf'^{name}_bucket\{{le="([^"]+)"\}}$')
    acc: dict[float, float] = {}
    for k, m in m1.items():
        for key, v in m.items():
            mt = pat.match(key)
            if mt:
                le = float(mt.group(1))
                acc[le] = acc.get(le, 0.0) + v - m0.get(k, {}).get(key, 0.0)
    return sorted(acc.items())


def hist_pct(buckets: list[tuple[float, float]], p: float) -> float:
    """The upper bound of the bucket holding the p-th percentile."""
    total = buckets[-1][1] if buckets else 0
    for le, c in buckets:
        if total and c >= p / 100 * total:
            return le
    return float("nan")


async def delivery_phase(srv: Server, pg: Pg, n: int, a: argparse.Namespace) -> dict:
    from core.db.engine import session_scope
    from core.jobs import execution

    async with httpx.AsyncClient(base_url=srv.base, headers=srv.headers, timeout=30) as c:
        job = await new_job(c)
    with session_scope(srv.db) as s:
        cl = execution.claim(s, srv.tenant, job, "api-load-bench", 3600)
        assert cl.outcome == "claimed", cl
    attempt = cl.attempt
    last = 2  # queued, running

    def commit(i: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        with session_scope(srv.db) as s:
            execution.report(s, srv.tenant, job, attempt, 3600, event=("log", {"level": "info", "message": f"e{i}"}))
        return t0, time.perf_counter()  # session_scope committed on exit

    crowd = Crowd(srv, job, n, a.sse_client)
    row: dict[str, Any] = {"followers": n, "events": [], "load": os.getloadavg()[0]}
    try:
        row["connect_s"] = await crowd.connect(n)
        await asyncio.sleep(2.0)
        m0 = await srv.scrape_all()
        cpu: dict[str, Any] = {}
        with profiled(srv, a, "delivery"), cpu_use(srv, pg.name, cpu):
            for i in range(a.events):
                seq = last + 1 + i
                before, committed = await asyncio.to_thread(commit, i)
                deadline = committed + 10
                while True:
                    missing = [f for f in crowd.followers if seq not in f.seen]
                    if not missing or time.perf_counter() > deadline:
                        break
                    await asyncio.sleep(0.005)
                lat = [f.seen[seq] - committed for f in crowd.followers if seq in f.seen]
                row["events"].append({"commit_s": committed - before, "lat": lat, "missing": len(missing)})
                await asyncio.sleep(a.event_gap)
        m1 = await srv.scrape_all()
        row["server_hist"] = hist_delta(m0, m1, "secateurs_sse_notify_to_send_seconds")
        row["notifications"] = sum(
            m["secateurs_sse_notifications_total"] - m0.get(k, {}).get("secateurs_sse_notifications_total", 0)
            for k, m in m1.items()
        )
        row["cpu"] = cpu
        row["dropped"] = len(crowd.dropped())
        # the job's end ends every stream: each follower must end cleanly, having seen every event
        with session_scope(srv.db) as s:
            execution.finish(s, srv.tenant, job, attempt, outcome="failed", error=("bench", "done"))
        final = last + a.events + 1
        await asyncio.wait_for(asyncio.gather(*crowd.tasks, return_exceptions=True), 60)
        row["ended_clean"] = sum(1 for f in crowd.followers if f.ended and not f.error and final in f.seen)
    finally:
        await crowd.close()
    await wait_streams_closed(srv)
    return row


# --- 3. create throughput -----------------------------------------------------------------------------


async def create_phase(srv: Server, pg: Pg, conc: int, total: int, a: argparse.Namespace) -> dict:
    load = os.getloadavg()[0]
    lat: list[float] = []
    statuses: dict[str, int] = {}
    # one httpx client (one keep-alive connection) per concurrent client: a shared pool of 32 connections
    # costs the load generator several ms of CPU per request (httpcore checks every pooled connection)
    async with AsyncExitStack() as stack:
        cs = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=srv.base, headers=srv.headers, timeout=60, limits=httpx.Limits(max_connections=1)
                )
            )
            for _ in range(conc)
        ]
        await asyncio.gather(*(new_job(c) for c in cs))  # warm-up: connections, code paths
        todo = iter(range(total))

        async def client(c: httpx.AsyncClient) -> None:
            for _ in todo:
                t0 = time.perf_counter()
                r = await c.post("/v1/pruning-jobs", json=BODY)
                lat.append(time.perf_counter() - t0)
                key = f"{r.status_code} {r.headers.get('secateurs-enqueue', '')}".strip()
                statuses[key] = statuses.get(key, 0) + 1

        cpu: dict[str, Any] = {}
        stop = threading.Event()
        waits = asyncio.create_task(asyncio.to_thread(pg.waits, stop))
        with profiled(srv, a, f"create-{conc}"), cpu_use(srv, pg.name, cpu):
            t0 = time.perf_counter()
            await asyncio.gather(*(client(c) for c in cs))
            wall = time.perf_counter() - t0
        stop.set()
        pg_waits = await waits
    return {
        "concurrency": conc,
        "lat": lat,
        "wall": wall,
        "statuses": statuses,
        "cpu": cpu,
        "pg_waits": pg_waits,
        "load": load,
    }


# --- the run ------------------------------------------------------------------------------------------


def ms(x: float) -> str:
    return f"{x * 1000:.2f}"


async def run_workers(workers: int, pg: Pg, a: argparse.Namespace, logdir: Path, queue: str) -> dict:
    cap = max([*a.followers, a.delivery_followers]) + 100
    srv = await start_server(pg.url, a.redis, queue, workers, cap, logdir)
    out: dict[str, Any] = {"workers": workers, "idle": [], "delivery": None, "create": []}
    try:
        print(f"\n=== API with --workers {workers} (pid {srv.proc.pid}; log {srv.log}) ===", flush=True)
        print(f"one /metrics scrape = {srv.scrape_cost:g} API transaction(s)", flush=True)
        if "idle" in a.parts:
            async with httpx.AsyncClient(base_url=srv.base, headers=srv.headers, timeout=30) as c:
                follow_job, get_job = await new_job(c), await new_job(c)
            await asyncio.sleep(a.settle)  # the start's and these creates' transactions are flushed
            for n in a.followers:
                row = await idle_phase(srv, pg, n, follow_job, get_job, a)
                out["idle"].append(row)
                api = " + ".join(f"{x:.2f}" for x in row["api_tps"])
                print(
                    f"idle {n:>5} followers: GET p50 {ms(pct(row['get'], 50))} ms p99 {ms(pct(row['get'], 99))} ms; "
                    f"tx/s pg {row['pg_tps']:.2f}, API {api}; connect {row['connect_s']:.1f} s; "
                    f"dropped {row['dropped']}; non-200 {row['get_non200']}",
                    flush=True,
                )
                print("    during the GETs, " + cpu_note(row["get_cpu"]), flush=True)
                print("    while idle, " + cpu_note(row["idle_cpu"]), flush=True)
                print(f"    bench-db backends seen active while idle: {row['pg_activity']}", flush=True)
        if "delivery" in a.parts:
            row = await delivery_phase(srv, pg, a.delivery_followers, a)
            out["delivery"] = row
            allat = [x for e in row["events"] for x in e["lat"]]
            print(
                f"delivery to {row['followers']} followers, {len(row['events'])} events: p50 {ms(pct(allat, 50))} ms "
                f"p99 {ms(pct(allat, 99))} ms max {ms(max(allat))} ms; missing "
                f"{sum(e['missing'] for e in row['events'])}; dropped {row['dropped']}; ended clean "
                f"{row['ended_clean']}/{row['followers']}; notifications heard {row['notifications']:g}",
                flush=True,
            )
            print("    " + cpu_note(row["cpu"]), flush=True)
            print(
                "    per event, first / p50 / p99 ms: "
                + ", ".join(
                    f"{ms(min(e['lat']))}/{ms(pct(e['lat'], 50))}/{ms(pct(e['lat'], 99))}" for e in row["events"]
                ),
                flush=True,
            )
        if "create" in a.parts:
            for conc in a.concurrency:
                row = await create_phase(srv, pg, conc, a.creates, a)
                out["create"].append(row)
                print(
                    f"create x{conc}: {len(row['lat']) / row['wall']:.1f} jobs/s p50 {ms(pct(row['lat'], 50))} ms "
                    f"p99 {ms(pct(row['lat'], 99))} ms {row['statuses']}",
                    flush=True,
                )
                print("    " + cpu_note(row["cpu"]), flush=True)
                top = sorted(row["pg_waits"].items(), key=lambda kv: -kv[1])[:4]
                print(f"    bench-db backends active (sampled every 20 ms), by wait: {dict(top)}", flush=True)
        out["log_errors"] = srv.errors_in_log()
    finally:
        stop_server(srv)
    return out


def report(results: list[dict], a: argparse.Namespace, load: tuple[float, float, float]) -> None:
    print("\n" + "=" * 100)
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(
        f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}, load average before: "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, after: " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    print("API: `python -m cli service api --workers N` (uvicorn, 1 event loop + threadpool per process);")
    print(
        f"load generator: this process, one asyncio loop (requests: httpx; SSE followers: {a.sse_client}) + 1 thread "
        "for the commits; nothing pinned"
    )
    if any(r["idle"] for r in results):
        print(f"\n1. Idle followers of one queued job: {a.gets} sequential GETs of another job (one keep-alive")
        print(f"   connection); transactions/s over {a.window:g} s of idle (pg_stat_database; API counter per process)")
        print("   baseline: the same GETs with no follower, measured just before the followers connected;")
        print("   × : ratio to that baseline (in brackets: to the 0-follower row); CPU ms/GET: the API's CPU per GET")
        rows = []

        def cpu_ms(c: dict[str, Any]) -> str:
            return f"{c['api_cores'] * c['wall'] / (a.gets + 10) * 1000:.2f}"

        for r in results:
            zero = next((x for x in r["idle"] if x["followers"] == 0), None)
            for row in r["idle"]:
                p50, p99 = pct(row["get"], 50), pct(row["get"], 99)
                b50, b99 = pct(row["base"], 50), pct(row["base"], 99)
                ratio = f"{p50 / b50:.2f} / {p99 / b99:.2f}"
                if zero is not None and zero is not row:
                    ratio += f" ({p50 / pct(zero['get'], 50):.2f} / {p99 / pct(zero['get'], 99):.2f})"
                rows.append(
                    [
                        str(r["workers"]),
                        str(row["followers"]),
                        f"{ms(p50)} / {ms(p99)}",
                        f"{ms(b50)} / {ms(b99)}" if row["followers"] else "",
                        ratio if row["followers"] else "",
                        f"{cpu_ms(row['get_cpu'])} / {cpu_ms(row['base_cpu'])}"
                        if row["followers"]
                        else cpu_ms(row["get_cpu"]),
                        f"{row['pg_tps']:.2f}" + (f" (av {row['autovacuum']})" if row["autovacuum"] else ""),
                        " + ".join(f"{x:.2f}" for x in row["api_tps"]),
                        f"{row['idle_cpu']['api_cores']:.3f}",
                        str(row["dropped"]),
                        f"{row['load']:.2f}",
                    ]
                )
        head = ["workers", "followers", "GET p50 / p99 ms", "baseline ms", "× p50 / p99", "CPU ms/GET (base)"]
        head += ["pg tx/s", "API tx/s", "API cores idle", "dropped", "load"]
        print(table(head, rows))
    if any(r["delivery"] for r in results):
        print("\n2. Event delivery: commit (report() in its own transaction) -> `id:` line read by every follower;")
        print(f"   {a.events} events, {a.event_gap:g} s apart; server: notify -> written (histogram bucket bounds)")
        rows = []
        for r in results:
            d = r["delivery"]
            if not d:
                continue
            allat = [x for e in d["events"] for x in e["lat"]]
            firsts = [min(e["lat"]) for e in d["events"] if e["lat"]]
            p99s = [pct(e["lat"], 99) for e in d["events"]]
            rows.append(
                [
                    str(r["workers"]),
                    str(d["followers"]),
                    ms(pct(allat, 50)),
                    ms(pct(allat, 99)),
                    ms(max(allat)),
                    f"{ms(min(p99s))} / {ms(pct(p99s, 50))} / {ms(max(p99s))}",
                    ms(pct(firsts, 50)),
                    f"≤{ms(hist_pct(d['server_hist'], 50))} / ≤{ms(hist_pct(d['server_hist'], 99))}",
                    ms(pct([e["commit_s"] for e in d["events"]], 50)),
                    str(sum(e["missing"] for e in d["events"])),
                    f"{d['ended_clean']}/{d['followers']}",
                    f"{d['load']:.2f}",
                ]
            )
        head = ["workers", "followers", "p50 ms", "p99 ms", "max ms", "per-event p99 min/med/max", "first ms"]
        print(table([*head, "server p50/p99 ms", "commit ms", "missing", "ended clean", "load"], rows))
    if any(r["create"] for r in results):
        print(f"\n3. Create throughput: {a.creates} POST /v1/pruning-jobs per row (enqueue to Redis included)")
        rows = []
        for r in results:
            for c in r["create"]:
                rows.append(
                    [
                        str(r["workers"]),
                        str(c["concurrency"]),
                        f"{len(c['lat']) / c['wall']:.1f}",
                        ms(pct(c["lat"], 50)),
                        ms(pct(c["lat"], 99)),
                        f"{c['cpu']['api_cores']:.2f}",
                        f"{c['cpu']['bench_cores']:.2f}",
                        f"{c['cpu']['pg_cores']:.2f}",
                        ", ".join(f"{k}: {v}" for k, v in sorted(c["statuses"].items())),
                        f"{c['load']:.2f}",
                    ]
                )
        head = [
            "workers",
            "clients",
            "jobs/s",
            "p50 ms",
            "p99 ms",
            "API cores",
            "bench cores",
            "pg cores",
            "responses",
            "load",
        ]
        print(table(head, rows))
    for r in results:
        errs = r.get("log_errors") or []
        print(f"\nAPI log (--workers {r['workers']}): {len(errs)} error lines" + "".join(f"\n  {e}" for e in errs[:10]))


async def amain(a: argparse.Namespace) -> int:
    raise_nofile()
    load = os.getloadavg()
    pg = Pg(a.pg)
    queue = f"secateurs-load-{uuid.uuid4().hex[:6]}"
    results = []
    try:
        from core.db.migrate import upgrade

        upgrade(pg.url)
        with tempfile.TemporaryDirectory(prefix="api-load-") as tmp:
            for w in a.workers:
                results.append(await run_workers(w, pg, a, Path(tmp), queue))
        report(results, a, load)
        return 0
    finally:
        from core.db.engine import dispose_all

        dispose_all()
        pg.drop()
        import redis

        r = redis.Redis.from_url(a.redis)  # the queue and kombu's bindings of it
        r.delete(queue, *r.scan_iter(f"_kombu.binding*.{queue}"))


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument(
        "--pg",
        default=os.environ.get("SECATEURS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
    )
    ap.add_argument("--redis", default=os.environ.get("SECATEURS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--workers", type=ints, default=[1, 2], help="API processes, one run each (1,2)")
    ap.add_argument("--followers", type=ints, default=[0, 100, 1000, 2000], help="idle follower counts")
    ap.add_argument("--gets", type=int, default=200, help="timed sequential GETs per follower count")
    ap.add_argument("--window", type=float, default=10.0, help="seconds of idle over which transactions are counted")
    ap.add_argument("--settle", type=float, default=12.0, help="seconds before that window (statistics flush)")
    ap.add_argument("--delivery-followers", type=int, default=1000)
    ap.add_argument("--events", type=int, default=10, help="events committed in the delivery part")
    ap.add_argument("--event-gap", type=float, default=0.5, help="seconds between them")
    ap.add_argument("--concurrency", type=ints, default=[1, 8, 32], help="concurrent create clients")
    ap.add_argument("--creates", type=int, default=200, help="creates per concurrency")
    ap.add_argument("--parts", default="idle,delivery,create", help="which parts run")
    ap.add_argument(
        "--sse-client",
        choices=["raw", "httpx"],
        default="raw",
        help="how followers read their streams: a bare asyncio protocol (default) or httpx's stream reader",
    )
    ap.add_argument(
        "--py-spy", metavar="DIR", help="record the API processes with py-spy during the GETs and deliveries"
    )
    a = ap.parse_args()
    a.parts = {p.strip() for p in a.parts.split(",")}
    return asyncio.run(amain(a))


if __name__ == "__main__":
    sys.exit(main())
