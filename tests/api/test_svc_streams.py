"""Job event streams on Postgres are pushed, not polled: a real API process (uvicorn) on real Postgres, many
followers, a real pruning run writing the events."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, require
from tests.e2e.stack import free_port
from tests.service_fixtures import REDIS_URL, redis_up, wipe

pytestmark = pytest.mark.slow
CAP = 205  # streams per tenant per process in these servers


@dataclass
class Server:
    base: str
    db_url: str
    models: Path
    headers: dict[str, str]
    tenant: str
    proc: subprocess.Popen
    log: Path

    def metric(self, name: str) -> float:
        text = httpx.get(self.base + "/metrics", timeout=10).text
        m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
        assert m, f"{name} not in /metrics"
        return float(m.group(1))


def start_server(db_url: str, tmp: Path, models: Path, workers: int = 1) -> Server:
    from core.auth import create_key, create_tenant
    from core.db.engine import session_scope
    from core.settings import Settings

    env = {k: v for k, v in os.environ.items() if not k.startswith("SECATEURS_")}
    env.update(
        SECATEURS_ENV="test",
        SECATEURS_DATA_DIR=str(tmp / "var"),
        SECATEURS_DATABASE_URL=db_url,
        SECATEURS_BROKER_URL=REDIS_URL,
        SECATEURS_QUEUE=f"secateurs-streams-{uuid.uuid4().hex[:8]}",
        SECATEURS_SECRET_KEY="streams-secret",
        SECATEURS_ALLOWED_MODEL_ROOTS=str(models),
        SECATEURS_SSE_MAX_STREAMS_PER_TENANT=str(CAP),
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    with session_scope(db_url) as s:
        tenant = create_tenant(s, f"streams-{uuid.uuid4().hex[:6]}").id
        _, key = create_key(s, tenant, Settings(_env_file=None, secret_key="streams-secret").pepper)
    port = free_port()
    log = tmp / f"api-{port}.log"
    cmd = [sys.executable, "-m", "cli", "service", "api", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", str(workers)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    srv = Server(f"http://127.0.0.1:{port}", db_url, models, {"Authorization": f"Bearer {key}"}, tenant, proc, log)
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(srv.base + "/readyz", timeout=2).status_code == 200:
                return srv
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


def stop_server(srv: Server) -> None:
    import signal

    try:
        os.killpg(srv.proc.pid, signal.SIGTERM)
        srv.proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(5)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def models(stories260k: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("models")
    shutil.copytree(stories260k, models / "stories260k", copy_function=shutil.copyfile)
    for p in [models / "stories260k", *(models / "stories260k").rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return models


@pytest.fixture(scope="module")
def server(pg_database: str, models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    require(redis_up(), f"Redis not reachable at {REDIS_URL}")
    wipe(pg_database)
    srv = start_server(pg_database, tmp_path_factory.mktemp("streams"), models)
    yield srv
    stop_server(srv)


def new_job(srv: Server) -> str:
    body = {
        "model": str(srv.models / "stories260k"),
        "method": "wanda",
        "sparsity": 0.5,
        "calibration": {
            "texts": ["Once upon a time there was a little girl named Lily. " * 40],
            "nsamples": 4,
            "seqlen": 64,
        },
    }
    r = httpx.post(srv.base + "/v1/pruning-jobs", json=body, headers=srv.headers, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def run_job(srv: Server, job_id: str) -> str:
    """One real attempt of the job, in this process (the worker's own code; it writes the events)."""
    from core.settings import Settings
    from worker.runner import run_job as run

    s = Settings(_env_file=None, env="test", database_url=srv.db_url, device="cpu", data_dir=srv.log.parent / "w")
    return run(s, srv.tenant, job_id, "test-worker")


def all_events(srv: Server, job_id: str) -> list[dict]:
    out: list[dict] = []
    after = 0
    while True:
        r = httpx.get(
            f"{srv.base}/v1/pruning-jobs/{job_id}/events", params={"after": after, "limit": 1000}, headers=srv.headers
        ).json()
        out += r["data"]
        if not r["has_more"]:
            return out
        after = out[-1]["id"]


class Follower:
    """One SSE client: connects, records every event (id, type), ends when the server ends the stream."""

    def __init__(self, client: httpx.AsyncClient, srv: Server, job_id: str, last_event_id: int | None = None) -> None:
        self.client, self.srv, self.job_id, self.last = client, srv, job_id, last_event_id
        self.events: list[int] = []
        self.connected = asyncio.Event()
        self.status: int | None = None
        self.headers: dict[str, str] = {}

    async def run(self, stop_after: int | None = None) -> None:
        headers = dict(self.srv.headers)
        if self.last is not None:
            headers["Last-Event-ID"] = str(self.last)
        url = f"{self.srv.base}/v1/pruning-jobs/{self.job_id}/events/stream"
        async with self.client.stream("GET", url, headers=headers) as r:
            self.status, self.headers = r.status_code, dict(r.headers)
            if r.status_code != 200:
                self.connected.set()
                await r.aread()
                return
            async for line in r.aiter_lines():
                if line.startswith("retry:"):
                    self.connected.set()
                elif line.startswith("id: "):
                    self.events.append(int(line[4:]))
                    if stop_after is not None and len(self.events) >= stop_after:
                        return


def _client() -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=0)
    return httpx.AsyncClient(timeout=httpx.Timeout(120, connect=30), limits=limits)


async def _follow(srv: Server, job_id: str, n: int) -> tuple[list[Follower], list[asyncio.Task]]:
    client = _client()
    followers = [Follower(client, srv, job_id) for _ in range(n)]
    tasks = [asyncio.create_task(f.run()) for f in followers]
    await asyncio.wait_for(asyncio.gather(*(f.connected.wait() for f in followers)), 60)
    return followers, tasks


def test_200_followers_each_get_every_event_of_a_real_run_once_and_in_order(server: Server):
    jid = new_job(server)

    async def main() -> list[Follower]:
        followers, tasks = await _follow(server, jid, 200)
        assert server.metric("secateurs_sse_streams_open") == 200
        assert await asyncio.to_thread(run_job, server, jid) == "succeeded"
        await asyncio.wait_for(asyncio.gather(*tasks), 60)  # every stream ends after the terminal status
        return followers

    followers = asyncio.run(main())
    expected = [e["id"] for e in all_events(server, jid)]
    assert expected == list(range(1, len(expected) + 1)) and len(expected) > 10
    for f in followers:
        assert f.events == expected
    assert server.metric("secateurs_sse_streams_open") == 0
    assert server.metric("secateurs_sse_notifications_total") >= len(expected) - 1


def test_idle_followers_cost_the_database_nothing(server: Server):
    """The API's own count of database transactions while followers of a queued job sit idle: the same for
    200 followers as for 10 (polling cost two per follower per half second)."""
    jid = new_job(server)

    async def idle_rate(n: int) -> float:
        followers, tasks = await _follow(server, jid, n)
        await asyncio.sleep(1.0)  # their connect-time reads are done
        t0, c0 = time.monotonic(), await asyncio.to_thread(server.metric, "secateurs_db_transactions_total")
        await asyncio.sleep(4.0)
        c1 = await asyncio.to_thread(server.metric, "secateurs_db_transactions_total")
        rate = (c1 - c0) / (time.monotonic() - t0)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return rate

    async def main() -> tuple[float, float]:
        return await idle_rate(10), await idle_rate(200)

    few, many = asyncio.run(main())
    # each /metrics scrape reads the job counts (a transaction or two); nothing else should happen
    assert few <= 2 and many <= 2, (few, many)
    _wait_gauge_zero(server)


def _wait_gauge_zero(srv: Server) -> None:
    deadline = time.time() + 10
    while srv.metric("secateurs_sse_streams_open") != 0:
        assert time.time() < deadline, "open-stream gauge did not come back to 0"
        time.sleep(0.1)


def test_a_follower_reconnecting_with_last_event_id_gets_exactly_what_it_missed(server: Server):
    from core.db.engine import session_scope
    from core.jobs import execution

    jid = new_job(server)

    def report(i: int) -> None:
        with session_scope(server.db_url) as s:
            execution.report(s, server.tenant, jid, 1, 60, event=("log", {"level": "info", "message": f"m{i}"}))

    with session_scope(server.db_url) as s:
        execution.claim(s, server.tenant, jid, "w", 60)  # events 1 (queued) and 2 (running)

    async def main() -> tuple[list[int], list[int]]:
        client = _client()
        first = Follower(client, server, jid)
        task = asyncio.create_task(first.run(stop_after=4))
        await first.connected.wait()
        for i in range(2):
            await asyncio.to_thread(report, i)  # 3, 4
        await asyncio.wait_for(task, 30)  # it hangs up after event 4
        for i in range(2, 5):
            await asyncio.to_thread(report, i)  # 5, 6, 7 while it is away
        second = Follower(client, server, jid, last_event_id=first.events[-1])
        task = asyncio.create_task(second.run())
        await second.connected.wait()
        await asyncio.to_thread(report, 5)  # 8
        with session_scope(server.db_url) as s:
            execution.finish(s, server.tenant, jid, 1, outcome="failed", error=("x", "y"))  # 9: ends the stream
        await asyncio.wait_for(task, 30)
        return first.events, second.events

    first, second = asyncio.run(main())
    assert first == [1, 2, 3, 4]
    assert second == [5, 6, 7, 8, 9]
    _wait_gauge_zero(server)


def test_the_per_tenant_cap_answers_429_and_closed_streams_give_their_slot_back(server: Server):
    jid = new_job(server)

    async def main() -> None:
        followers, tasks = await _follow(server, jid, CAP)
        extra = Follower(_client(), server, jid)
        await extra.run()
        assert extra.status == 429 and int(extra.headers["retry-after"]) >= 1
        assert extra.headers["content-type"] == "application/problem+json"
        for t in tasks[:5]:
            t.cancel()
        await asyncio.gather(*tasks[:5], return_exceptions=True)
        again = Follower(_client(), server, jid)
        deadline = time.monotonic() + 10
        while True:  # the server notices the disconnects
            task = asyncio.create_task(again.run())
            await again.connected.wait()
            if again.status == 200:
                break
            assert time.monotonic() < deadline, again.status
            await asyncio.sleep(0.2)
            again = Follower(_client(), server, jid)
        for t in [*tasks, task]:
            t.cancel()
        await asyncio.gather(*tasks, task, return_exceptions=True)

    asyncio.run(main())
    _wait_gauge_zero(server)


def test_with_two_api_processes_every_follower_gets_every_event(pg_database: str, models: Path, tmp_path: Path):
    require(redis_up(), f"Redis not reachable at {REDIS_URL}")
    srv = start_server(pg_database, tmp_path, models, workers=2)
    try:
        jid = new_job(srv)

        async def main() -> list[Follower]:
            followers, tasks = await _follow(srv, jid, 40)
            assert await asyncio.to_thread(run_job, srv, jid) == "succeeded"
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
            return followers

        followers = asyncio.run(main())
        expected = [e["id"] for e in all_events(srv, jid)]
        assert all(f.events == expected for f in followers)
    finally:
        stop_server(srv)


def test_streams_end_cleanly_when_the_server_shuts_down(pg_database: str, models: Path, tmp_path: Path):
    require(redis_up(), f"Redis not reachable at {REDIS_URL}")
    import signal

    srv = start_server(pg_database, tmp_path, models)
    jid = new_job(srv)

    async def main() -> list[Follower]:
        """SIGTERM: uvicorn waits for open responses before shutting down; the streams must end at once."""
        followers, tasks = await _follow(srv, jid, 20)
        t0 = time.monotonic()
        os.killpg(srv.proc.pid, signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*tasks), 15)  # every stream ended (no error: a clean end)
        # uvicorn re-raises the signal it caught once it has shut down gracefully
        assert await asyncio.to_thread(srv.proc.wait, 15) in (0, -signal.SIGTERM)
        assert time.monotonic() - t0 < 10
        return followers

    followers = asyncio.run(main())
    assert all(f.status == 200 for f in followers)
    log = srv.log.read_text()
    assert "Application shutdown complete" in log and "timeout graceful shutdown exceeded" not in log, log[-2000:]


def test_followers_get_every_later_event_across_a_postgres_restart(models: Path, tmp_path: Path):
    """Postgres (a cluster this test owns) restarts while 20 followers are connected: the API's listener
    reconnects and catches up, including events committed before it was listening again."""
    require(redis_up(), f"Redis not reachable at {REDIS_URL}")
    from core.db.engine import dispose_all, session_scope
    from core.db.migrate import upgrade
    from core.jobs import execution
    from tests.e2e.stack import PostgresServer, pg_available

    require(pg_available(), "initdb/pg_ctl and the postgres OS user are needed to run a Postgres of our own")
    pg = PostgresServer()
    pg.start()
    srv = None
    try:
        upgrade(pg.url())
        srv = start_server(pg.url(), tmp_path, models)
        jid = new_job(srv)
        with session_scope(pg.url()) as s:
            execution.claim(s, srv.tenant, jid, "w", 600)

        def report(i: int) -> None:
            with session_scope(pg.url()) as s:
                execution.report(s, srv.tenant, jid, 1, 600, event=("log", {"level": "info", "message": f"m{i}"}))

        async def main() -> list[Follower]:
            followers, tasks = await _follow(srv, jid, 20)
            await asyncio.to_thread(report, 0)
            deadline = time.monotonic() + 30
            while any(len(f.events) < 3 for f in followers):  # all of them are past their backlog read
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await asyncio.to_thread(pg.stop)
            await asyncio.sleep(4)  # the listener's reconnect backoff grows to seconds
            await asyncio.to_thread(pg.start)
            dispose_all()  # this process's pooled connections died with the server
            # at once, before the API listens again (its listener retries with backoff): only the catch-up
            # after it reconnects brings these, the last events of the job
            await asyncio.to_thread(report, 1)
            with session_scope(pg.url()) as s:
                execution.finish(s, srv.tenant, jid, 1, outcome="failed", error=("x", "y"))
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
            return followers

        followers = asyncio.run(main())
        expected = [e["id"] for e in all_events(srv, jid)]
        assert expected == list(range(1, len(expected) + 1)) and len(expected) == 5
        for f in followers:
            assert f.events == expected
    finally:
        if srv is not None:
            stop_server(srv)
        dispose_all()
        pg.destroy()
