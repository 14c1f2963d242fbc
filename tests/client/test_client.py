"""The Python client against the real service (tests/remote_stack.py: uvicorn, Postgres, Redis, a Celery worker,
moto S3), every route; connections broken on cue by a TCP proxy (tests/fault_proxy.py) for what must survive
them: a create retried after its answer was lost, an event stream cut mid-event, a download cut mid-file."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from client import (
    AuthenticationError,
    BadRequest,
    CalibrationSet,
    ChecksumMismatch,
    Client,
    Conflict,
    DownloadError,
    Event,
    Job,
    NotFound,
    Progress,
    RetryPolicy,
    ServiceUnavailable,
)
from tests.fault_proxy import FaultProxy
from tests.remote_stack import RemoteStack

pytestmark = pytest.mark.slow
FAST = RetryPolicy(max_retries=4, backoff=0.05, max_backoff=0.5)


def _problem(status: int, code: str, retry_after: int | None = None) -> bytes:
    body = json.dumps({"type": "about:blank", "title": "Busy", "status": status, "code": code}).encode()
    head = f"HTTP/1.1 {status} Busy\r\nContent-Type: application/problem+json\r\nContent-Length: {len(body)}\r\n"
    if retry_after is not None:
        head += f"Retry-After: {retry_after}\r\n"
    return (head + "Connection: close\r\n\r\n").encode() + body


class Sleeps(list):
    def __call__(self, s: float) -> None:
        self.append(s)
        time.sleep(s)


def test_wait_follows_the_stream_across_cuts_and_polls_when_streaming_is_not_possible(
    remote_stack: RemoteStack, api_proxy: FaultProxy, live_job: str
):
    # two stream connections are cut in the middle of their third event; the client reconnects with the last id
    cut = api_proxy.arm(b"x-follower: streamer", "cut", pattern=b"\nevent: ", count=3, times=2)
    # for the other follower, something in between answers the stream with a web page: it polls instead
    page = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 6\r\nConnection: close\r\n\r\n<html>"
    api_proxy.arm(b"x-follower: poller", "respond", canned=page, times=1)
    polled: dict[str, Any] = {}

    def poller() -> None:
        with Client(api_proxy.url, remote_stack.key, retry=FAST, headers={"X-Follower": "poller"}) as c:
            events: list[Event] = []
            polled["job"] = c.wait(live_job, on_event=events.append, poll_interval=0.2, timeout=120)
            polled["events"] = events

    t = threading.Thread(target=poller)
    t.start()
    events: list[Event] = []
    progress: list[Progress] = []
    with Client(api_proxy.url, remote_stack.key, retry=FAST, headers={"X-Follower": "streamer"}) as c:
        job = c.wait(live_job, on_event=events.append, on_progress=progress.append, timeout=120)
    t.join(130)
    assert job.status == "succeeded", f"{job}\n{remote_stack.logs()}"
    assert cut.fired == 2
    ids = [e.id for e in events]
    assert ids == list(range(1, len(ids) + 1)), ids  # every event once, in order, none lost at the cuts
    assert events[-1].terminal and events[-1].data["status"] == "succeeded"
    streams = api_proxy.requests("/events/stream")
    resumed = [h for h in streams if "x-follower: streamer" in h.lower()]
    assert len(resumed) == 3, resumed
    last_ids = [int(h.lower().split("last-event-id: ")[1].split("\r\n")[0]) for h in resumed]
    assert last_ids[0] == 0 and 0 < last_ids[1] < last_ids[2] < ids[-1], last_ids
    assert any(p.stage == "prune" and p.block is not None and p.total_blocks == 5 for p in progress), progress
    assert all(p.fraction is None or 0 <= p.fraction <= 1 for p in progress)
    # the poller: GET with If-None-Match, then the events after the last seen; the same events in the end
    assert polled["job"].status == "succeeded"
    assert [e.id for e in polled["events"]] == ids
    gets = api_proxy.requests(f"GET /v1/pruning-jobs/{live_job} ")
    assert any("if-none-match" in h.lower() for h in gets)


def test_every_route_and_the_problem_fields_of_errors(
    remote_stack: RemoteStack, parked_job: str, finished_job: dict[str, Any], tmp_path: Path
):
    with remote_stack.client() as c, remote_stack.client(remote_stack.s3_base) as parked:
        assert c.health().status == "ok" and c.ready().status == "ok"
        # calibration sets: upload (a path, bytes), get, list, find by sha256 and format
        cs = c.upload_calibration_set(remote_stack.cal_file)
        assert isinstance(cs, CalibrationSet) and cs.format == "txt" and cs.records > 1
        assert cs.sha256 == hashlib.sha256(remote_stack.cal_file.read_bytes()).hexdigest()
        assert c.get_calibration_set(cs.id) == cs
        lines = "\n".join(json.dumps({"text": t}) for t in remote_stack.text.split("\n\n")[:20])
        cs2 = c.upload_calibration_set(("corpus.jsonl", lines.encode()))
        assert cs2.format == "jsonl" and cs2.records == 20
        listed = [s.id for s in c.iter_calibration_sets(page_size=1)]
        assert listed.index(cs2.id) < listed.index(cs.id)  # newest first, across pages
        assert c.find_calibration_set(cs.sha256, "txt") == cs and c.find_calibration_set(cs.sha256, "jsonl") is None
        again, uploaded = c.ensure_calibration_set(remote_stack.cal_file)
        assert again.id in listed and not uploaded
        with pytest.raises(BadRequest) as bad:
            c.upload_calibration_set(("empty.txt", b""))
        assert bad.value.status == 422 and bad.value.errors[0]["loc"] == ["body", "file"]
        with pytest.raises(NotFound) as nf:
            c.get_calibration_set("cal_00000000000000000000000000")
        assert nf.value.status == 404 and nf.value.code == "not_found" and nf.value.title and nf.value.detail

        # jobs: create (through the parked API: these stay queued), list page by page, get, ETag, cancel, events
        tag = uuid.uuid4().hex[:8]
        made = [parked.create_job(remote_stack.job_body(metadata={"page": tag, "n": str(i)})) for i in range(3)]
        assert all(isinstance(j, Job) and j.status == "queued" for j in made)
        assert all(j.enqueue == "published" and not j.replayed for j in made)  # Secateurs-Enqueue
        mine = [j.id for j in c.iter_jobs(page_size=2) if j.metadata.get("page") == tag]
        assert mine == [j.id for j in reversed(made)]  # newest first, no page repeats one
        assert {j.id for j in made} <= {j.id for j in c.iter_jobs(status=["queued", "running"])}
        assert c.list_jobs(limit=1).has_more
        job, etag = c.get_job_if_changed(made[0].id, None)
        assert job is not None and job.id == made[0].id and etag
        assert c.get_job_if_changed(made[0].id, etag) == (None, etag)  # 304
        replay = parked.create_job(
            remote_stack.job_body(metadata={"page": tag, "n": "0"}), idempotency_key=f"replay-{tag}"
        )
        again = parked.create_job(
            remote_stack.job_body(metadata={"page": tag, "n": "0"}), idempotency_key=f"replay-{tag}"
        )
        assert (replay.enqueue, replay.replayed) == ("published", False)
        assert again.id == replay.id and (again.enqueue, again.replayed) == (None, True)  # the stored answer
        assert parked.cancel_job(replay.id).status == "cancelled"
        for j in made:
            assert c.cancel_job(j.id).status == "cancelled"
        assert c.cancel_job(made[0].id).status == "cancelled"  # idempotent
        job, etag2 = c.get_job_if_changed(made[0].id, etag)
        assert job is not None and job.status == "cancelled" and etag2 != etag
        events = list(c.iter_events(made[0].id, page_size=1))
        assert [e.data.get("status") for e in events if e.type == "status"] == ["queued", "cancelled"]
        assert c.list_events(made[0].id, after=1).data == events[1:]
        assert [e.id for e in c.stream_events(made[0].id)] == [e.id for e in events]
        arts = c.list_artifacts(finished_job["id"])
        assert {"config.json", "model.safetensors", "manifest.json", "metrics.json"} <= {a.name for a in arts}
        assert c.list_artifacts(made[0].id) == []

        with pytest.raises(BadRequest) as bad:
            c.create_job(remote_stack.job_body(sparsity=1.5))
        p = bad.value
        assert (p.status, p.code, p.title) == (422, "validation_error", "Invalid request")
        assert p.errors[0]["loc"] == ["body", "sparsity"] and "sparsity" in (p.detail or "")
        with pytest.raises(Conflict) as conflict:
            c.cancel_job(finished_job["id"])
        assert conflict.value.code == "job_finished"
        with pytest.raises(NotFound):
            c.get_job("job_nope")
    with Client(remote_stack.base, "sct_wrong") as c, pytest.raises(AuthenticationError) as auth:
        c.list_jobs()
    assert auth.value.status == 401 and auth.value.to_dict()["status"] == 401


def test_retries_never_make_a_second_job_nor_a_second_upload(remote_stack: RemoteStack, parked_job: str):
    # a proxy in front of the parked API: the server creates the job, the answer never reaches the client
    proxy = FaultProxy(int(remote_stack.s3_base.rsplit(":", 1)[1]))
    try:
        dropped = proxy.arm(b"POST /v1/pruning-jobs ", "drop")
        tag = uuid.uuid4().hex
        with Client(proxy.url, remote_stack.key, retry=FAST) as c:
            job = c.create_job(remote_stack.job_body(metadata={"retry": tag}))
            assert dropped.fired == 1
            posts = proxy.requests("POST /v1/pruning-jobs ")
            keys = {h.lower().split("idempotency-key: ")[1].split("\r\n")[0] for h in posts}
            assert len(posts) == 2 and len(keys) == 1  # the retry sent the first attempt's key
            same = [j.id for j in c.iter_jobs() if j.metadata.get("retry") == tag]
            assert same == [job.id]  # one job, and the retry got it back
            c.cancel_job(job.id)

            # an upload whose answer is lost: found by its sha256 instead of sent again
            proxy.arm(b"POST /v1/calibration-sets ", "drop")
            data = f"a text seen once {tag}\n\nand a second paragraph".encode()
            cs = c.upload_calibration_set(("once.txt", data))
            assert len(proxy.requests("POST /v1/calibration-sets ")) == 1
            assert [s.id for s in c.iter_calibration_sets() if s.sha256 == cs.sha256] == [cs.id]

            # 503 and 429 with Retry-After: waited as the server says, then retried
            sleeps = Sleeps()
            c.sleep = sleeps
            proxy.arm(f"GET /v1/pruning-jobs/{job.id} ", "respond", canned=_problem(503, "database_unavailable", 1))
            proxy.arm(f"GET /v1/pruning-jobs/{job.id} ", "respond", canned=_problem(429, "too_many", 2))
            assert c.get_job(job.id).id == job.id
            assert sleeps == [1.0, 2.0]
        with Client(proxy.url, remote_stack.key, retry=RetryPolicy(max_retries=0)) as c:
            proxy.arm(f"GET /v1/pruning-jobs/{job.id} ", "respond", canned=_problem(503, "database_unavailable", 1))
            with pytest.raises(ServiceUnavailable) as e:
                c.get_job(job.id)
            assert e.value.status == 503 and e.value.code == "database_unavailable"
    finally:
        proxy.close()


def _partial(dest: Path, job_id: str) -> Path:
    return dest.parent / f".{dest.name}.{job_id}.partial"


def test_download_resumes_with_range_and_verifies(
    remote_stack: RemoteStack, api_proxy: FaultProxy, finished_job: dict[str, Any], tmp_path: Path
):
    jid = finished_job["id"]
    with remote_stack.client() as c:
        arts = {a.name: a for a in c.list_artifacts(jid)}
    size = arts["model.safetensors"].size
    name = b"/artifacts/model.safetensors"

    # cut mid-file with no retries: the call fails, the partial file stays; the next call resumes it
    dest = tmp_path / "model"
    api_proxy.arm(name, "cut", after_bytes=size // 2)
    with Client(api_proxy.url, remote_stack.key, retry=RetryPolicy(max_retries=0)) as c:
        with pytest.raises(DownloadError):
            c.download(jid, dest)
    part = _partial(dest, jid) / "model.safetensors"
    have = part.stat().st_size
    assert 0 < have < size and not dest.exists()
    with Client(api_proxy.url, remote_stack.key, retry=FAST) as c:
        result = c.download(jid, dest)
    ranged = [h for h in api_proxy.requests(name) if "range:" in h.lower()]
    assert len(ranged) == 1 and f"range: bytes={have}-" in ranged[0].lower()
    got = {f.name: f for f in result.files}
    assert got["model.safetensors"].resumed_from == have and not got["model.safetensors"].restarted
    assert got["model.safetensors"].transferred == size - have
    assert not _partial(dest, jid).exists() and result.path == dest
    for a in arts.values():
        assert hashlib.sha256((dest / a.name).read_bytes()).hexdigest() == a.sha256
    assert sorted(p.name for p in dest.iterdir()) == sorted(arts)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dest)
    w = model.model.layers[0].mlp.down_proj.weight
    assert abs(float((w == 0).float().mean()) - 0.5) < 0.02

    # cut mid-file with retries: one call, resumed by itself
    api_proxy.arm(name, "cut", after_bytes=size // 3)
    with Client(api_proxy.url, remote_stack.key, retry=FAST) as c:
        result = c.download(jid, tmp_path / "again")
    f = {f.name: f for f in result.files}["model.safetensors"]
    assert f.transferred == size and not f.restarted
    assert len([h for h in api_proxy.requests(name) if "range:" in h.lower()]) == 2

    # a damaged partial file: found out by its sha256 and downloaded again whole
    dest3 = tmp_path / "damaged"
    api_proxy.arm(name, "cut", after_bytes=size // 2)
    with Client(api_proxy.url, remote_stack.key, retry=RetryPolicy(max_retries=0)) as c:
        with pytest.raises(DownloadError):
            c.download(jid, dest3)
    part = _partial(dest3, jid) / "model.safetensors"
    raw = bytearray(part.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    part.write_bytes(bytes(raw))
    with remote_stack.client() as c:
        result = c.download(jid, dest3)
    f = {f.name: f for f in result.files}["model.safetensors"]
    assert f.restarted and f.resumed_from > 0
    assert hashlib.sha256((dest3 / "model.safetensors").read_bytes()).hexdigest() == arts["model.safetensors"].sha256

    # the destination must be absent or empty (or replaced on request); streamed in small chunks
    with remote_stack.client() as c:
        with pytest.raises(DownloadError, match="not an empty directory"):
            c.download(jid, dest)
        import tracemalloc

        tracemalloc.start()
        c.download(jid, dest, overwrite=True, chunk_size=64 * 1024)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < size / 2, (peak, size)
        # the server's copy damaged: the download refuses it
        stored = next(remote_stack.artifacts_root.rglob(f"{jid}/attempt-*/metrics.json"))
        original = stored.read_bytes()
        try:
            stored.write_bytes(original[:-2] + b"?\n")
            with pytest.raises(ChecksumMismatch) as mismatch:
                c.download(jid, tmp_path / "bad")
            assert mismatch.value.name == "metrics.json"
        finally:
            stored.write_bytes(original)
        assert not (tmp_path / "bad").exists()


def test_download_follows_the_presigned_redirect_without_the_api_key(
    remote_stack: RemoteStack, finished_job: dict[str, Any], tmp_path: Path
):
    """The API on S3 answers 307 to a presigned URL; the client goes there without its key, resumes a cut
    transfer there with Range, and verifies every file."""
    jid = finished_job["id"]
    remote_stack.copy_artifacts_to_s3(jid)  # the same objects, in the S3 bucket
    proxy = remote_stack.s3_proxy
    size = next(a["size"] for a in finished_job_artifacts(remote_stack, jid) if a["name"] == "model.safetensors")
    proxy.arm(b"/model.safetensors?", "cut", after_bytes=size // 2)
    with remote_stack.client(remote_stack.s3_base) as c:
        result = c.download(jid, tmp_path / "from-s3")
    heads = proxy.requests(f"/jobs/{jid}/")
    assert heads and all("authorization" not in h.lower() and remote_stack.key not in h for h in heads)
    assert any("x-amz-signature=" in h.lower() for h in heads)
    ranged = [h for h in heads if "/model.safetensors?" in h and "range: bytes=" in h.lower()]
    assert len(ranged) == 1
    f = {f.name: f for f in result.files}["model.safetensors"]
    assert f.transferred == size and f.resumed_from == 0  # resumed within the call
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "from-s3")


def finished_job_artifacts(st: RemoteStack, jid: str) -> list[dict[str, Any]]:
    with st.http() as c:
        return c.get(f"/v1/pruning-jobs/{jid}/artifacts").json()["data"]
