"""Downloading a job's artifacts: resumable, verified, streamed, and atomic.

- Files are written into ``.<dest>.<job>.partial`` beside ``dest`` (named after the job, so a later call
  finds and resumes it), then the whole directory is renamed into place once every file verified.
- A partial file is resumed with ``Range: bytes=<size>-`` (the API serves ranges from local storage; on S3 it
  answers 307 to a presigned URL, which is followed without the API key, and S3 serves ranges too). A server
  that answers the whole file (200) restarts it.
- Every file's size and sha256 are checked against the artifact list, and against ``manifest.json`` when the
  job has one. A resumed file that does not verify (its partial part was damaged) is downloaded once more from
  the start; a fresh file that does not verify raises :class:`ChecksumMismatch`.
- Bodies are written and hashed piece by piece as they arrive (a piece is what one read of the connection
  gives, 64 KiB at most; ``chunk_size`` bounds the reads of a partial file being hashed), so memory stays small
  whatever the model's size, and an interrupted transfer keeps every byte that arrived.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin

import httpx

from client.client import DownloadedFile, DownloadResult, raise_for_problem, retry_after
from client.errors import ChecksumMismatch, DownloadError
from client.models import Artifact

if TYPE_CHECKING:
    from client.client import Client

STATE = ".secateurs-download.json"  # in the partial directory: what it is a download of
MANIFEST = "manifest.json"


class _Retry(Exception):
    def __init__(self, why: str, after: float | None = None) -> None:
        super().__init__(why)
        self.after = after


class _Restart(Exception):
    """The server cannot continue from the partial file (416, or a range other than the one asked)."""


def _safe_name(name: str) -> PurePosixPath:
    p = PurePosixPath(name)
    if not name or name.startswith("/") or "\\" in name or any(part in ("", ".", "..") for part in name.split("/")):
        raise DownloadError(f"refusing artifact name {name!r}")
    return p


def download(
    client: Client,
    job_id: str,
    dest: Path,
    *,
    overwrite: bool = False,
    chunk_size: int = 1 << 20,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> DownloadResult:
    """Every artifact of ``job_id`` into the directory ``dest`` (absent, empty, or replaced with
    ``overwrite``). ``on_progress(name, bytes_done, size)`` is called as bytes arrive."""
    dest = Path(dest).expanduser().absolute()
    if dest.exists() and not overwrite and (not dest.is_dir() or any(dest.iterdir())):
        raise DownloadError(f"{dest} exists and is not an empty directory (overwrite to replace it)")
    artifacts = client.list_artifacts(job_id)
    if not artifacts:
        job = client.get_job(job_id)
        raise DownloadError(f"job {job_id} has no artifacts (it is {job.status})")
    names = [_safe_name(a.name) for a in artifacts]
    if len(set(names)) != len(names):
        raise DownloadError(f"job {job_id} lists an artifact twice")
    staging = dest.parent / f".{dest.name}.{job_id}.partial"
    state = {"job_id": job_id, "artifacts": [[a.name, a.size, a.sha256] for a in artifacts]}
    if staging.exists() and _read_state(staging) != state:  # a partial download of something else: start over
        shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    (staging / STATE).write_text(json.dumps(state))
    files = [
        _fetch(client, job_id, a, staging.joinpath(*name.parts), chunk_size, on_progress)
        for a, name in zip(artifacts, names, strict=True)
    ]
    _check_manifest(staging, artifacts)
    (staging / STATE).unlink()
    _into_place(staging, dest)
    return DownloadResult(job_id, dest, files)


def _read_state(staging: Path) -> Any:
    try:
        return json.loads((staging / STATE).read_text())
    except (OSError, ValueError):
        return None


def _into_place(staging: Path, dest: Path) -> None:
    _fsync_dir(staging)
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()
    if dest.exists() or dest.is_symlink():
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dest, old)
        os.replace(staging, dest)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(staging, dest)
    _fsync_dir(dest.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_manifest(staging: Path, artifacts: list[Artifact]) -> None:
    """The manifest written with the model lists every other file with its size and sha256: both lists agree."""
    if not any(a.name == MANIFEST for a in artifacts):
        return
    try:
        listed = json.loads((staging / MANIFEST).read_text())["files"]
        entries = {f["name"]: (int(f["size"]), str(f["sha256"])) for f in listed}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DownloadError(f"{MANIFEST} cannot be read: {e}") from e
    by_name = {a.name: a for a in artifacts}
    for name, (size, digest) in entries.items():
        art = by_name.get(name)
        if art is None:
            raise DownloadError(f"{MANIFEST} lists {name}, which is not among the job's artifacts")
        if art.size != size:
            raise ChecksumMismatch(name, str(size), str(art.size), "size (manifest)")
        if art.sha256 != digest:
            raise ChecksumMismatch(name, digest, art.sha256, "sha256 (manifest)")
    missing = sorted(set(by_name) - set(entries) - {MANIFEST})
    if missing:
        raise DownloadError(f"{MANIFEST} does not list {', '.join(missing)}")


def _hash_file(path: Path, chunk_size: int) -> Any:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h


def _fetch(
    client: Client,
    job_id: str,
    art: Artifact,
    path: Path,
    chunk_size: int,
    on_progress: Callable[[str, int, int], None] | None,
) -> DownloadedFile:
    path.parent.mkdir(parents=True, exist_ok=True)
    have = path.stat().st_size if path.is_file() else 0
    if have > art.size:
        path.unlink()
        have = 0
    rec = DownloadedFile(art.name, art.size, art.sha256, resumed_from=have)
    h = _hash_file(path, chunk_size) if have else hashlib.sha256()
    failures = 0
    while True:
        if have == art.size:
            digest = h.hexdigest()
            if digest == art.sha256:
                break
            if rec.resumed_from and not rec.restarted:  # the part kept from before was damaged: once more, whole
                rec.restarted = True
                path.unlink()
                have, h = 0, hashlib.sha256()
                continue
            path.unlink()
            raise ChecksumMismatch(art.name, art.sha256, digest)
        try:
            with _open(client, job_id, art.name, have) as (response, start):
                if start != have:  # the whole file came back: start it again
                    have, h = 0, hashlib.sha256()
                with open(path, "ab" if have else "wb") as f:
                    for chunk in response.iter_bytes():
                        if have + len(chunk) > art.size:
                            raise _Restart()
                        f.write(chunk)
                        h.update(chunk)
                        have += len(chunk)
                        rec.transferred += len(chunk)
                        if on_progress is not None:
                            on_progress(art.name, have, art.size)
                    f.flush()
                    os.fsync(f.fileno())
            if have != art.size:
                raise _Retry(f"{art.name}: the body ended at {have} of {art.size} bytes")
        except _Restart:
            path.unlink(missing_ok=True)
            have, h = 0, hashlib.sha256()
            rec.restarted = rec.restarted or rec.resumed_from > 0
            failures += 1
        except (httpx.TransportError, _Retry) as e:
            failures += 1
            if failures > client.retry.max_retries:
                raise DownloadError(
                    f"{art.name}: giving up after {failures} attempts ({e!r}); run again to resume"
                ) from e
            client.sleep(client.retry.delay(failures - 1, getattr(e, "after", None)))
        if failures > client.retry.max_retries + 2:
            raise DownloadError(f"{art.name}: the server keeps refusing to resume; giving up")
    return rec


@contextmanager
def _open(client: Client, job_id: str, name: str, offset: int) -> Iterator[tuple[httpx.Response, int]]:
    """The artifact's body from ``offset`` (a Range request when > 0), and the offset it really starts at."""
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    api = client.http
    response = api.send(api.build_request("GET", client.artifact_path(job_id, name), headers=headers), stream=True)
    try:
        if response.status_code in (301, 302, 303, 307, 308) and "location" in response.headers:
            url = urljoin(str(response.request.url), response.headers["location"])
            response.close()
            # a presigned storage URL: its own client, which has never seen the API key
            storage = client.storage_http
            response = storage.send(storage.build_request("GET", url, headers=headers), stream=True)
            if response.status_code in (400, 403):  # a presigned URL that expired meanwhile: ask the API again
                raise _Retry(f"storage answered {response.status_code}")
        if response.status_code == 416:
            raise _Restart()
        if response.status_code in (429, 503) or response.status_code >= 500:
            raise _Retry(f"{response.status_code}", retry_after(response))
        raise_for_problem(response)
        start = 0
        if response.status_code == 206:
            start = _range_start(response.headers.get("content-range", ""))
            if start != offset:
                raise _Restart()
        elif response.status_code != 200:
            raise DownloadError(f"{name}: unexpected status {response.status_code}")
        yield response, start
    finally:
        response.close()


def _range_start(content_range: str) -> int:
    """``bytes 100-999/1000`` -> 100 (-1 when unparsable)."""
    unit, _, rest = content_range.partition(" ")
    first = rest.split("-", 1)[0]
    return int(first) if unit == "bytes" and first.isdigit() else -1
