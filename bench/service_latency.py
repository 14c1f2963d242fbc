"""Job-create and job-GET latency of the API on loopback, against Postgres (+ Redis broker).

    python bench/service_latency.py [--creates 300] [--gets 2000] [--concurrency 8]

Starts uvicorn (one process) on a fresh, migrated Postgres database, creates a tenant and key, then
measures POST /v1/pruning-jobs and GET /v1/pruning-jobs/{id} from concurrent clients. No worker runs: jobs
stay queued (the enqueue to Redis is part of the measured create). Prints p50/p90/p99 and throughput.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def report(name: str, lat: list[float], wall: float) -> str:
    ms = [x * 1000 for x in lat]
    return (
        f"{name:<12} n={len(ms):<5} p50={pct(ms, 50):6.2f} ms  p90={pct(ms, 90):6.2f} ms  "
        f"p99={pct(ms, 99):6.2f} ms  mean={statistics.fmean(ms):6.2f} ms  {len(ms) / wall:7.1f} req/s"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--pg",
        default=os.environ.get("SECATEURS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
    )
    ap.add_argument("--redis", default=os.environ.get("SECATEURS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--creates", type=int, default=300)
    ap.add_argument("--gets", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=8)
    a = ap.parse_args()

    from urllib.parse import urlparse

    import psycopg

    from core.auth import create_key, create_tenant
    from core.db.engine import dispose_all, session_scope
    from core.db.migrate import upgrade

    u = urlparse(a.pg.replace("+psycopg", ""))
    admin = dict(
        host=u.hostname,
        port=u.port or 5432,
        user=u.username or "postgres",
        password=u.password,
        dbname=u.path.lstrip("/") or "postgres",
        autocommit=True,
    )
    name = f"secateurs_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(**admin) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    db = urlparse(a.pg)._replace(path="/" + name).geturl()
    queue = f"secateurs-bench-{uuid.uuid4().hex[:6]}"
    api = None
    try:
        upgrade(db)
        with session_scope(db) as s:
            t = create_tenant(s, "bench")
            _, key = create_key(s, t.id, b"bench-secret")
        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            port = sk.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SECATEURS_")}
        env.update(
            SECATEURS_DATABASE_URL=db,
            SECATEURS_BROKER_URL=a.redis,
            SECATEURS_QUEUE=queue,
            SECATEURS_SECRET_KEY="bench-secret",
            SECATEURS_DATA_DIR=str(ROOT / "var" / "bench"),
        )
        api = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "api.app:create_app",
                "--factory",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )
        base = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        h = {"Authorization": f"Bearer {key}"}
        body = {
            "model": "meta-llama/Llama-3.2-1B",
            "method": "wanda",
            "sparsity": 0.5,
            "calibration": {"source": "c4", "nsamples": 128, "seqlen": 2048},
            "metadata": {"bench": "1"},
        }
        clients = [httpx.Client(base_url=base, headers=h, timeout=30) for _ in range(a.concurrency)]
        for c in clients:  # warm up connections and code paths
            c.post("/v1/pruning-jobs", json=body).raise_for_status()

        def create(i: int) -> tuple[float, str]:
            c = clients[i % a.concurrency]
            t0 = time.perf_counter()
            r = c.post("/v1/pruning-jobs", json=body)
            dt = time.perf_counter() - t0
            assert r.status_code == 201, r.text
            return dt, r.json()["id"]

        with ThreadPoolExecutor(a.concurrency) as ex:
            t0 = time.perf_counter()
            res = list(ex.map(create, range(a.creates)))
            wall_c = time.perf_counter() - t0
        ids = [j for _, j in res]

        def get(i: int) -> float:
            c = clients[i % a.concurrency]
            t0 = time.perf_counter()
            r = c.get(f"/v1/pruning-jobs/{ids[i % len(ids)]}")
            dt = time.perf_counter() - t0
            assert r.status_code == 200
            return dt

        with ThreadPoolExecutor(a.concurrency) as ex:
            t0 = time.perf_counter()
            gets = list(ex.map(get, range(a.gets)))
            wall_g = time.perf_counter() - t0
        print(f"loopback, uvicorn x1, Postgres + Redis, {a.concurrency} concurrent clients, {os.cpu_count()} CPUs")
        print(report("POST create", [d for d, _ in res], wall_c))
        print(report("GET job", gets, wall_g))
        for c in clients:
            c.close()
        return 0
    finally:
        if api is not None:
            os.killpg(api.pid, signal.SIGTERM)
            api.wait(10)
        dispose_all()
        with psycopg.connect(**admin) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        import redis

        redis.Redis.from_url(a.redis).delete(queue)


if __name__ == "__main__":
    sys.exit(main())
