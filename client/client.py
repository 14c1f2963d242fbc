"""The HTTP client of the secateurs API: one method per route, retries that never duplicate a job, ``wait``
over the event stream (reconnecting, or polling when streaming is not possible) and verified downloads."""

from __future__ import annotations

import email.utils
import hashlib
import io
import itertools
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from client import sse
from client.errors import (
    ApiError,
    ConnectionFailed,
    StreamUnavailable,
    WaitTimeout,
    api_error,
)
from client.models import (
    Artifact,
    ArtifactList,
    CalibrationSet,
    CalibrationSetList,
    CreatedJob,
    Event,
    EventList,
    Health,
    Job,
    JobList,
    Progress,
    Ready,
)

__version__ = "0.1.0"
M = TypeVar("M", bound=BaseModel)

JOBS = "/v1/pruning-jobs"
SETS = "/v1/calibration-sets"
CALIBRATION_FORMATS = {".txt": "txt", ".jsonl": "jsonl"}
# transport errors raised before the request can have reached the server: any request may be retried after them
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
RETRY_STATUSES = frozenset({429, 503})
ENQUEUE_HEADER = "Secateurs-Enqueue"  # on a creation's answer: published | deferred


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: attempt ``n`` (0-based) waits ``backoff * 2**n`` (at most
    ``max_backoff``), scaled by a random factor in [0.5, 1]; a ``Retry-After`` from the server is waited instead
    (at most ``max_retry_after``)."""

    max_retries: int = 5
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_retry_after: float = 120.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return max(0.0, min(retry_after, self.max_retry_after))
        return min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + random.random() / 2)


def retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), or None."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def raise_for_problem(response: httpx.Response) -> None:
    """Raise the :class:`ApiError` an error response carries (its problem+json fields)."""
    if response.status_code < 400:
        return
    if not response.is_closed:
        response.read()
    raise api_error(response.status_code, _body(response), dict(response.headers))


def sha256_of(path: Path, chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


class Client:
    """``Client("http://host:8000", api_key="sct_...")``; a context manager (or call :meth:`close`).

    Every call retries transport errors and ``503``/``429`` answers with exponential backoff honouring
    ``Retry-After`` (``retry=RetryPolicy(...)``). A request that may have reached the server is retried only
    where a repeat is harmless: reads, cancels, and job creation, which sends one ``Idempotency-Key`` on all
    its attempts so a retry gets the first attempt's job back instead of a second job. ``headers`` go with
    every API request, never to storage.
    """

    def __init__(
        self,
        server: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        stream_read_timeout: float = 60.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.server = server.rstrip("/")
        self.retry = retry or RetryPolicy()
        self.timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        # the server writes a keep-alive comment every 15 s: a stream silent for longer than this is dead
        self.stream_timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0), read=stream_read_timeout)
        self.sleep = sleep
        api_headers = {"User-Agent": f"secateurs-client/{__version__}", "Accept": "application/json", **(headers or {})}
        if api_key:
            api_headers["Authorization"] = f"Bearer {api_key}"
        self.http = httpx.Client(
            base_url=self.server, headers=api_headers, timeout=self.timeout, transport=transport, follow_redirects=False
        )
        # for presigned storage URLs: never the API's headers (the API key stays with the API)
        self.storage_http = httpx.Client(
            headers={"User-Agent": f"secateurs-client/{__version__}"},
            timeout=self.timeout,
            transport=transport,
            follow_redirects=True,
        )

    # plumbing ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        self.http.close()
        self.storage_http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool = True,
        retry_codes: Sequence[str] = (),
        rewind: Callable[[], None] | None = None,
        max_retries: int | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """One API call with the retry policy; returns the response, whatever its status. ``idempotent=False``:
        only errors raised before the request was sent are retried (``ConnectionFailed.maybe_sent`` tells the
        others). ``retry_codes``: problem codes (of 409 answers) that are retried too."""
        limit = self.retry.max_retries if max_retries is None else max_retries
        for attempt in itertools.count():
            if rewind is not None:
                rewind()
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError as e:
                maybe_sent = not isinstance(e, NOT_SENT)
                if attempt >= limit or (maybe_sent and not idempotent):
                    raise ConnectionFailed(f"{method} {self.server}{path}: {e!r}", maybe_sent=maybe_sent) from e
                self.sleep(self.retry.delay(attempt))
                continue
            if attempt < limit and self._retryable(response, retry_codes):
                self.sleep(self.retry.delay(attempt, retry_after(response)))
                continue
            return response
        raise AssertionError("unreachable")

    @staticmethod
    def _retryable(response: httpx.Response, retry_codes: Sequence[str]) -> bool:
        if response.status_code in RETRY_STATUSES:
            return True
        if retry_codes and response.status_code == 409:
            body = _body(response)
            return isinstance(body, dict) and body.get("code") in retry_codes
        return False

    def _call(self, model: type[M], method: str, path: str, *, ok: Sequence[int] = (200,), **kwargs: Any) -> M:
        return self._parse(model, self._response(method, path, ok=ok, **kwargs), method, path)

    def _response(self, method: str, path: str, *, ok: Sequence[int] = (200,), **kwargs: Any) -> httpx.Response:
        """The answer of a call (retried as :meth:`request` says) whose status is one of ``ok``; raises the
        :class:`ApiError` it carries otherwise."""
        response = self.request(method, path, **kwargs)
        raise_for_problem(response)
        if response.status_code not in ok:
            raise api_error(response.status_code, _body(response), dict(response.headers))
        return response

    @staticmethod
    def _parse(
        model: type[M], response: httpx.Response, method: str, path: str, extra: Mapping[str, Any] | None = None
    ) -> M:
        try:
            document = response.json()
            return model.model_validate({**document, **extra} if extra and isinstance(document, dict) else document)
        except ValueError as e:  # not JSON, or not the document the route answers (pydantic's error is one too)
            raise ApiError(response.status_code, "Unexpected response", f"{method} {path}: {e}") from None

    # health ----------------------------------------------------------------------------------------------
    def health(self) -> Health:
        return self._call(Health, "GET", "/healthz")

    def ready(self) -> Ready:
        """``/readyz``; raises :class:`ServiceUnavailable` (no retries) when a dependency is down."""
        return self._call(Ready, "GET", "/readyz", max_retries=0)

    # jobs ------------------------------------------------------------------------------------------------
    def create_job(
        self, body: Mapping[str, Any] | None = None, *, idempotency_key: str | None = None, **fields: Any
    ) -> CreatedJob:
        """``POST /v1/pruning-jobs`` with ``body`` (a job document: model, method, sparsity or pattern,
        calibration, ...) and/or the same fields as keywords. All attempts send one ``Idempotency-Key`` (a fresh
        one unless given), so a retry after a lost response returns the job the first attempt created.

        The job comes back with what the answer's headers said: ``enqueue`` (``published`` or ``deferred``, from
        ``Secateurs-Enqueue``) and ``replayed`` (see :class:`CreatedJob`)."""
        payload = {**(body or {}), **fields}
        key = idempotency_key or f"secateurs-client-{uuid.uuid4()}"
        response = self._response(
            "POST",
            JOBS,
            ok=(200, 201),
            json=payload,
            headers={"Idempotency-Key": key},
            retry_codes=("idempotency_in_progress",),
        )
        enqueue = response.headers.get(ENQUEUE_HEADER, "").strip().lower()
        said = {
            "enqueue": enqueue if enqueue in ("published", "deferred") else None,
            "replayed": response.headers.get("idempotent-replayed", "").strip().lower() == "true",
        }
        return self._parse(CreatedJob, response, "POST", JOBS, said)

    def list_jobs(
        self, *, status: str | Sequence[str] | None = None, after: str | None = None, limit: int = 20
    ) -> JobList:
        """One page of jobs, newest first (``after``: the previous page's ``last_id``)."""
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status if isinstance(status, str) else ",".join(status)
        if after:
            params["after"] = after
        return self._call(JobList, "GET", JOBS, params=params)

    def iter_jobs(self, *, status: str | Sequence[str] | None = None, page_size: int = 100) -> Iterator[Job]:
        """Every job, newest first, page by page."""
        after: str | None = None
        while True:
            page = self.list_jobs(status=status, after=after, limit=page_size)
            yield from page.data
            if not page.has_more or not page.last_id:
                return
            after = page.last_id

    def get_job(self, job_id: str) -> Job:
        return self._call(Job, "GET", f"{JOBS}/{quote(job_id, safe='')}")

    def get_job_if_changed(self, job_id: str, etag: str | None) -> tuple[Job | None, str | None]:
        """``GET`` with ``If-None-Match: etag``: ``(None, etag)`` when the job is unchanged (304), else the job and
        its new ETag."""
        headers = {"If-None-Match": etag} if etag else {}
        response = self.request("GET", f"{JOBS}/{quote(job_id, safe='')}", headers=headers)
        if response.status_code == 304:
            return None, response.headers.get("etag", etag)
        raise_for_problem(response)
        return Job.model_validate(response.json()), response.headers.get("etag")

    def cancel_job(self, job_id: str) -> Job:
        """A queued job is cancelled at once; a running one goes to ``cancelling`` and stops between blocks.
        Idempotent (so retried like a read); :class:`Conflict` once the job succeeded or failed."""
        return self._call(Job, "POST", f"{JOBS}/{quote(job_id, safe='')}/cancel")

    def list_events(self, job_id: str, *, after: int = 0, limit: int = 100) -> EventList:
        return self._call(
            EventList, "GET", f"{JOBS}/{quote(job_id, safe='')}/events", params={"after": after, "limit": limit}
        )

    def iter_events(self, job_id: str, *, after: int = 0, page_size: int = 1000) -> Iterator[Event]:
        """Every event with ``id > after``, in order, page by page."""
        while True:
            page = self.list_events(job_id, after=after, limit=page_size)
            yield from page.data
            if not page.has_more or page.last_id is None:
                return
            after = page.last_id

    def stream_events(self, job_id: str, *, after: int = 0) -> Iterator[Event]:
        """One connection to the job's Server-Sent Events stream (``Last-Event-ID: after``): its events until the
        server ends it (after the terminal status event, or on shutdown). Connecting is retried as any read is;
        the connection dropping raises :class:`ConnectionFailed`; :class:`StreamUnavailable` when streaming is not
        possible here (too many streams, or something in between that does not pass the stream through)."""
        for item in self._stream(job_id, after):
            if item is not None:
                yield item

    def _stream(self, job_id: str, after: int) -> Iterator[Event | None]:
        """The stream's events, and None at each keep-alive (a point to check a deadline)."""
        path = f"{JOBS}/{quote(job_id, safe='')}/events/stream"
        headers = {"Accept": "text/event-stream", "Last-Event-ID": str(after)}
        for attempt in itertools.count():
            try:
                with self.http.stream("GET", path, headers=headers, timeout=self.stream_timeout) as response:
                    if response.status_code in (429, 404, 405, 406, 501) and not _is_problem_404(response):
                        response.read()
                        raise StreamUnavailable(f"event stream answered {response.status_code}")
                    if response.status_code == 503 and attempt < self.retry.max_retries:
                        response.read()
                        self.sleep(self.retry.delay(attempt, retry_after(response)))
                        continue
                    raise_for_problem(response)
                    ctype = response.headers.get("content-type", "")
                    if response.status_code != 200 or not ctype.startswith("text/event-stream"):
                        raise StreamUnavailable(f"event stream answered {response.status_code} {ctype or 'no type'}")
                    for message in sse.parse(response.iter_lines()):
                        if message.comment is not None:
                            yield None
                        elif message.data:
                            yield Event.model_validate_json(message.data)
                    return
            except httpx.TransportError as e:
                if attempt < self.retry.max_retries and isinstance(e, NOT_SENT):
                    self.sleep(self.retry.delay(attempt))
                    continue
                raise ConnectionFailed(f"event stream of {job_id}: {e!r}", maybe_sent=True) from e

    def follow(
        self,
        job_id: str,
        *,
        after: int = 0,
        stream: bool = True,
        poll_interval: float = 1.0,
        timeout: float | None = None,
        stream_failures: int = 3,
    ) -> Iterator[Event]:
        """The job's events with ``id > after``, each once and in order, ending with its terminal status event.

        Follows the event stream, reconnecting with ``Last-Event-ID`` whenever the connection drops or the server
        ends it early; polls instead (``GET`` with ``If-None-Match``, then the events after the last one seen)
        when streaming is not possible: ``stream=False``, a stream answered with something other than events, or
        ``stream_failures`` connections in a row that gave nothing. :class:`WaitTimeout` after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last = after
        streaming = stream
        failures = 0
        etag: str | None = None

        def expired() -> bool:
            return deadline is not None and time.monotonic() >= deadline

        while True:
            if expired():
                raise WaitTimeout(f"job {job_id} not finished after {timeout} s")
            if streaming:
                got = False
                try:
                    for item in self._stream(job_id, last):
                        if expired():
                            raise WaitTimeout(f"job {job_id} not finished after {timeout} s")
                        if item is None or item.id <= last:
                            continue
                        last, got = item.id, True
                        yield item
                        if item.terminal:
                            return
                except StreamUnavailable:
                    streaming = False
                    continue
                except ConnectionFailed:
                    pass
                # the stream ended before the terminal event: dropped, or the server is going away
                failures = 0 if got else failures + 1
                if failures >= stream_failures:
                    streaming = False
                    continue
                if failures:
                    self.sleep(self.retry.delay(failures - 1))
                continue
            job, etag = self.get_job_if_changed(job_id, etag)
            if job is not None:
                for event in self.iter_events(job_id, after=last):
                    last = event.id
                    yield event
                    if event.terminal:
                        return
                if job.terminal:
                    return
            remaining = None if deadline is None else deadline - time.monotonic()
            self.sleep(poll_interval if remaining is None else max(0.0, min(poll_interval, remaining)))

    def wait(
        self,
        job_id: str,
        *,
        on_event: Callable[[Event], None] | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        after: int = 0,
        stream: bool = True,
        poll_interval: float = 1.0,
        timeout: float | None = None,
    ) -> Job:
        """Follow the job (see :meth:`follow`) until it succeeds, fails or is cancelled; hand each event to
        ``on_event`` and each progress report to ``on_progress``; return the final job."""
        for event in self.follow(job_id, after=after, stream=stream, poll_interval=poll_interval, timeout=timeout):
            if on_event is not None:
                on_event(event)
            if on_progress is not None and event.type == "progress":
                on_progress(Progress.model_validate(event.data))
        return self.get_job(job_id)

    # artifacts -------------------------------------------------------------------------------------------
    def list_artifacts(self, job_id: str) -> list[Artifact]:
        return self._call(ArtifactList, "GET", f"{JOBS}/{quote(job_id, safe='')}/artifacts").data

    def artifact_path(self, job_id: str, name: str) -> str:
        return f"{JOBS}/{quote(job_id, safe='')}/artifacts/{quote(name, safe='/')}"

    def download(
        self,
        job_id: str,
        dest: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        chunk_size: int = 1 << 20,
        on_progress: Callable[[str, int, int], None] | None = None,
    ) -> DownloadResult:
        """Every artifact of the job into the directory ``dest`` (``AutoModelForCausalLM.from_pretrained`` loads
        it). See :func:`client.download.download`."""
        from client.download import download

        return download(self, job_id, Path(dest), overwrite=overwrite, chunk_size=chunk_size, on_progress=on_progress)

    # calibration sets ------------------------------------------------------------------------------------
    def upload_calibration_set(
        self, file: str | os.PathLike[str] | tuple[str, bytes | IO[bytes]], *, sha256: str | None = None
    ) -> CalibrationSet:
        """Upload a ``.txt`` or ``.jsonl`` file (a path, or ``(filename, bytes or binary file)``). An upload is not
        idempotent: when its connection fails after the request may have been sent, the tenant's sets are
        searched for the file's sha256 before it is sent again."""
        if isinstance(file, tuple):
            filename, content = file
            handle: IO[bytes] = io.BytesIO(content) if isinstance(content, bytes) else content
            owned = False
        else:
            path = Path(file)
            filename, handle, owned = path.name, open(path, "rb"), True
        try:
            start = handle.tell()
            digest = sha256 or _hash_stream(handle)
            fmt = CALIBRATION_FORMATS.get(Path(filename).suffix.lower())
            for attempt in itertools.count():
                try:
                    return self._call(
                        CalibrationSet,
                        "POST",
                        SETS,
                        ok=(200, 201),
                        files={"file": (filename, handle)},
                        idempotent=False,
                        rewind=lambda: handle.seek(start),
                    )
                except ConnectionFailed as e:
                    if not e.maybe_sent or attempt >= self.retry.max_retries:
                        raise
                    found = self.find_calibration_set(digest, fmt)
                    if found is not None:
                        return found
                    self.sleep(self.retry.delay(attempt))
            raise AssertionError("unreachable")
        finally:
            if owned:
                handle.close()

    def list_calibration_sets(self, *, after: str | None = None, limit: int = 20) -> CalibrationSetList:
        params: dict[str, Any] = {"limit": limit}
        if after:
            params["after"] = after
        return self._call(CalibrationSetList, "GET", SETS, params=params)

    def iter_calibration_sets(self, *, page_size: int = 100) -> Iterator[CalibrationSet]:
        after: str | None = None
        while True:
            page = self.list_calibration_sets(after=after, limit=page_size)
            yield from page.data
            if not page.has_more or not page.last_id:
                return
            after = page.last_id

    def get_calibration_set(self, set_id: str) -> CalibrationSet:
        return self._call(CalibrationSet, "GET", f"{SETS}/{quote(set_id, safe='')}")

    def find_calibration_set(self, sha256: str, format: str | None = None) -> CalibrationSet | None:
        """The tenant's newest calibration set with these bytes (and this format: the same bytes read as .txt and
        as .jsonl are different sets), or None."""
        for cs in self.iter_calibration_sets():
            if cs.sha256 == sha256 and (format is None or cs.format == format):
                return cs
        return None

    def ensure_calibration_set(self, path: str | os.PathLike[str]) -> tuple[CalibrationSet, bool]:
        """The calibration set holding this file: an existing one with the same sha256 and format, else a new
        upload. Returns the set and whether it was uploaded now."""
        path = Path(path)
        digest = sha256_of(path)
        found = self.find_calibration_set(digest, CALIBRATION_FORMATS.get(path.suffix.lower()))
        if found is not None:
            return found, False
        return self.upload_calibration_set(path, sha256=digest), True


def _is_problem_404(response: httpx.Response) -> bool:
    """A 404 problem document is about the job (raised as NotFound); a bare 404 means no stream route here."""
    return response.status_code == 404 and "problem+json" in response.headers.get("content-type", "")


def _hash_stream(handle: IO[bytes]) -> str:
    h = hashlib.sha256()
    start = handle.tell()
    while chunk := handle.read(1 << 20):
        h.update(chunk)
    handle.seek(start)
    return h.hexdigest()


@dataclass
class DownloadedFile:
    name: str
    size: int
    sha256: str
    resumed_from: int = 0  # bytes already on disk from an earlier, interrupted attempt
    restarted: bool = False  # a partial file did not verify and was downloaded again from the start
    transferred: int = 0  # bytes received for it by this call


@dataclass
class DownloadResult:
    job_id: str
    path: Path
    files: list[DownloadedFile]

    @property
    def transferred(self) -> int:
        return sum(f.transferred for f in self.files)

    def as_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "path": str(self.path),
            "files": [f.__dict__ for f in self.files],
            "transferred": self.transferred,
        }
