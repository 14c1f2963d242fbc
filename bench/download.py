"""A large artifact downloaded with the Python client through the real API while the connection is cut
several times mid-body: it resumes (Range), verifies, and how much memory the download takes.

    python bench/download.py [--size-mb 1024] [--cuts 3] [--keep]

Starts the API under uvicorn on the embedded defaults (SQLite, local artifact storage) in a temporary data
directory, creates a tenant and key, creates a job and makes it succeed by hand (no worker, no model: the
point is the transfer) with two artifacts: ``model.bin`` (``--size-mb`` MiB of pseudo-random bytes, written
into the storage directory) and ``manifest.json`` listing it with its size and sha256, as a real job's
manifest does. The client reaches the API through tests/fault_proxy.py, a TCP proxy armed to cut the
``model.bin`` answer ``--cuts`` times, each after a different number of bytes, so the client must resume
with ``Range: bytes=<have>-`` each time.

The download runs in a subprocess of its own (this script with ``--child``), so that its memory is only the
download's: it reports the peak RSS during ``Client.download`` minus the RSS just before it (the kernel's
high-water mark, reset with /proc/self/clear_refs before the download starts), and tracemalloc's peak of
Python allocations during the call. The 64 MiB target applies to the first (RSS: everything the process
holds, Python objects, C buffers, TLS and socket buffers included).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 1 << 20
NAME = "model.bin"


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(server: str, key: str, job_id: str, dest: Path) -> int:
    """The download alone, measured; prints one JSON line."""
    import tracemalloc

    from client import Client, RetryPolicy

    c = Client(server, key, retry=RetryPolicy(max_retries=6, backoff=0.2, max_backoff=2.0))
    c.list_artifacts(job_id)  # the connection pool and the models' code warmed up, outside the measure
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak RSS) to the current RSS
    rss_before = _rss_kib("VmRSS")
    tracemalloc.start()
    t0 = time.perf_counter()
    result = c.download(job_id, dest)
    wall = time.perf_counter() - t0
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    hwm = _rss_kib("VmHWM")
    c.close()
    f = next(x for x in result.files if x.name == NAME)  # (the manifest's bytes are not counted)
    print(
        json.dumps(
            {
                "wall_s": wall,
                "transferred": f.transferred,
                "size": f.size,
                "sha256": f.sha256,
                "rss_before_kib": rss_before,
                "rss_peak_kib": hwm,
                "tracemalloc_peak": py_peak,
            }
        ),
        flush=True,
    )
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_random(path: Path, size: int) -> str:
    """``size`` bytes of a seeded PRNG (incompressible), written in 8 MiB pieces; returns their sha256."""
    import numpy as np

    rng = np.random.default_rng(0)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MiB)
            block = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            h.update(block)
            f.write(block)
            left -= n
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024, help="the artifact's size in MiB (default 1024)")
    ap.add_argument("--cuts", type=int, default=3, help="connections cut mid-body (default 3)")
    ap.add_argument(
        "--storage",
        choices=("local", "s3"),
        default="local",
        help="local: the API streams the file; s3: moto S3, the API answers 307 to a presigned URL (default local)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--json", action="store_true", help="print the result as JSON too")
    ap.add_argument("--child", nargs=4, metavar=("SERVER", "KEY", "JOB", "DEST"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        server, key, job_id, dest = a.child
        return child(server, key, job_id, Path(dest))

    import httpx

    from tests.fault_proxy import FaultProxy

    size = a.size_mb * MiB
    tmp = Path(tempfile.mkdtemp(prefix="secateurs-dl-bench-"))
    data = tmp / "var"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECATEURS_")}
    env.update(
        SECATEURS_ENV="test",
        SECATEURS_DATA_DIR=str(data),
        SECATEURS_SECRET_KEY="download-bench",
        SECATEURS_ALLOWED_MODEL_ROOTS=str(tmp / "models"),
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    port = _free_port()
    moto = None
    if a.storage == "s3":  # moto in this process; the cuts happen between the client and it
        from moto.server import ThreadedMotoServer

        moto_port = _free_port()
        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
        moto.start()
        proxy = FaultProxy(moto_port)
        env.update(
            SECATEURS_STORAGE_BACKEND="s3",
            SECATEURS_S3_BUCKET="bench",
            SECATEURS_S3_ENDPOINT_URL=f"http://127.0.0.1:{moto_port}",
            SECATEURS_S3_PUBLIC_ENDPOINT_URL=proxy.url,
            SECATEURS_S3_ACCESS_KEY_ID="testing",
            SECATEURS_S3_SECRET_ACCESS_KEY="testing",
        )
    else:  # the cuts happen between the client and the API
        proxy = FaultProxy(port)
    os.environ.update({k: v for k, v in env.items() if k.startswith("SECATEURS_")})
    from core.auth import create_key, create_tenant
    from core.db.engine import session_scope
    from core.db.migrate import upgrade
    from core.settings import Settings

    settings = Settings(_env_file=None)
    settings.ensure_dirs()
    upgrade(settings.db_url)
    with session_scope(settings.db_url) as s:
        tenant = create_tenant(s, "bench").id
        _, key = create_key(s, tenant, settings.pepper)
    model = tmp / "models" / "m"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "llama"}')

    api = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory", "--host", "127.0.0.1"]
        + ["--port", str(port), "--log-level", "warning"],
        cwd=ROOT,
        env=env,
        stdout=open(tmp / "api.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        h = {"Authorization": f"Bearer {key}"}
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if api.poll() is not None or time.monotonic() > deadline:
                print((tmp / "api.log").read_text()[-3000:])
                return 1
            time.sleep(0.2)
        body = {"model": str(model), "method": "magnitude", "sparsity": 0.5}
        r = httpx.post(base + "/v1/pruning-jobs", json=body, headers=h, timeout=30)
        if r.status_code != 201:
            print(f"job create: {r.status_code} {r.text}")
            return 1
        job_id = r.json()["id"]

        # the artifacts, written into storage; the job made to succeed with them
        t0 = time.perf_counter()
        from core.db.models import Artifact
        from core.jobs import execution
        from core.storage import make_storage

        storage = make_storage(settings)
        prefix = f"tenants/{tenant}/jobs/{job_id}/attempt-1"
        staged = tmp / "staged"
        staged.mkdir()
        digest = _write_random(staged / NAME, size)
        manifest = json.dumps({"files": [{"name": NAME, "size": size, "sha256": digest}]}).encode()
        (staged / "manifest.json").write_bytes(manifest)
        if a.storage == "s3":
            storage.ensure_bucket()  # type: ignore[attr-defined]
        for name in (NAME, "manifest.json"):
            storage.put_file(f"{prefix}/{name}", staged / name)
            if a.storage == "local":
                (staged / name).unlink()  # (a copy is in the storage directory)
        t_write = time.perf_counter() - t0
        with session_scope(settings.db_url) as s:
            execution.claim(s, tenant, job_id, "bench", 60)
            arts = [
                Artifact(
                    tenant_id=tenant,
                    job_id=job_id,
                    attempt=1,
                    name=NAME,
                    kind="model",
                    size=size,
                    sha256=digest,
                    storage_key=f"{prefix}/{NAME}",
                ),
                Artifact(
                    tenant_id=tenant,
                    job_id=job_id,
                    attempt=1,
                    name="manifest.json",
                    kind="manifest",
                    size=len(manifest),
                    sha256=hashlib.sha256(manifest).hexdigest(),
                    storage_key=f"{prefix}/manifest.json",
                ),
            ]
            assert execution.finish(s, tenant, job_id, 1, outcome="succeeded", artifacts=arts) == "succeeded"

        # the cuts: each fault fires on one answer of model.bin, after its own number of bytes of that answer
        path = f"/v1/pruning-jobs/{job_id}/artifacts/{NAME}" if a.storage == "local" else f"/bench/{prefix}/{NAME}"
        spans = [size * (i + 1) // (a.cuts + 1) for i in range(a.cuts)]  # where each cut lands, in the file
        faults = []
        done = 0
        for at in spans:
            faults.append(proxy.arm(f"GET {path}", "cut", after_bytes=at - done))
            done = at  # the next answer starts where this one was cut (give or take the head's bytes)
        dest = tmp / "downloaded"
        out = subprocess.run(
            [sys.executable, __file__, "--child", proxy.url if a.storage == "local" else base, key, job_id, str(dest)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=3600,
        )
        if out.returncode != 0:
            print(out.stdout, out.stderr)
            return 1
        res: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        gets = proxy.requests(f"GET {path}")
        ranges = [g for g in gets if "\r\nrange: bytes=" in g.lower()]
        fired = sum(f.fired for f in faults)
        on_disk = hashlib.sha256()
        with open(dest / NAME, "rb") as f:
            while chunk := f.read(8 * MiB):
                on_disk.update(chunk)
        verified = on_disk.hexdigest() == digest == res["sha256"] and (dest / NAME).stat().st_size == size
        starts = [int(g.lower().split("range: bytes=")[1].split("-")[0]) for g in ranges]
        rss = (res["rss_peak_kib"] - res["rss_before_kib"]) / 1024
        rows = [
            ("artifact", f"{NAME}: {size:,} bytes ({size / MiB:,.0f} MiB), sha256 {digest[:16]}…"),
            ("connections cut mid-body", f"{fired} (at {', '.join(f'{x / MiB:,.0f}' for x in spans)} MiB)"),
            ("GETs of the artifact", f"{len(gets)}, of which Range requests (resumes): {len(ranges)}"),
            ("resumed from", ", ".join(f"{x / MiB:,.1f} MiB" for x in starts) or "-"),
            ("bytes of it received", f"{res['transferred']:,} ({res['transferred'] - size:+,} vs its size)"),
            (
                "sha256 verified",
                "yes (client, against the artifact list and manifest.json; and re-read here)" if verified else "NO",
            ),
            ("wall time of Client.download", f"{res['wall_s']:.1f} s"),
            ("throughput", f"{size / MiB / res['wall_s']:,.0f} MiB/s (through the proxy, retries' waits included)"),
            ("peak RSS of the download", f"{rss:.1f} MiB above the {res['rss_before_kib'] / 1024:.1f} MiB before it"),
            ("tracemalloc peak (Python objects)", f"{res['tracemalloc_peak'] / MiB:.2f} MiB"),
            ("setup: artifact written", f"{t_write:.1f} s"),
        ]
        w = max(len(k) for k, _ in rows)
        where = "local storage (the API streams it)" if a.storage == "local" else "S3 (moto; the API answers 307)"
        print(f"\nbench/download.py: {a.size_mb} MiB, {a.cuts} cuts, {where}, loopback\n")
        for k, v in rows:
            print(f"{k:<{w}}  {v}")
        ok = verified and fired == a.cuts and len(ranges) >= a.cuts and rss < 64
        print(f"\n{'PASS' if ok else 'FAIL'}: resumed {len(ranges)}x, verified, peak RSS {rss:.1f} MiB (< 64 MiB)")
        if a.json:
            print(json.dumps({**res, "cuts": fired, "ranges": len(ranges), "resume_at": starts, "verified": verified}))
        return 0 if ok else 1
    finally:
        proxy.close()
        if moto is not None:
            moto.stop()
        try:
            os.killpg(api.pid, signal.SIGTERM)
            api.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")


if __name__ == "__main__":
    sys.exit(main())
