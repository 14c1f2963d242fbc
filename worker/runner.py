"""One attempt of one pruning job: claim, prepare inputs, prune, publish artifacts, finish.

Runs inside the Celery child process (CUDA is touched only here). Every database write is its own short
transaction; writes are fenced by the attempt number, so a worker that lost its job cannot touch it.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from core.db.engine import session_scope
from core.db.models import Artifact
from core.db.outage import DATABASE_UNAVAILABLE, retry_while_unavailable
from core.db.repositories import CalibrationSetRepository
from core.jobs import execution
from core.pruning.config import PruneConfig
from core.pruning.errors import Cancelled, PruningError
from core.pruning.progress import RunFraction, planned_stages
from core.pruning.texts import parse_documents
from core.settings import Settings
from core.storage import Storage, StorageError, keys, make_storage
from worker.progress_throttle import ProgressThrottle

log = logging.getLogger("secateurs.worker")


class JobLost(Exception):
    """This attempt no longer owns the job (lease expired and it was handed on)."""


class ClaimUnavailable(Exception):
    """The job could not be claimed because the database stayed unreachable: its message must go back to the
    broker (redelivered), not be acknowledged."""


class _Control:
    def __init__(self) -> None:
        self.cancel = False
        self.lost = False

    def update(self, r: str) -> None:
        if r == "cancel":
            self.cancel = True
        elif r == "lost":
            self.lost = True

    @property
    def stop(self) -> bool:
        return self.cancel or self.lost


class _Heartbeat(threading.Thread):
    """Renews the lease every third of it; in between, writes the progress report the throttle holds."""

    def __init__(
        self, settings: Settings, tenant_id: str, job_id: str, attempt: int, ctl: _Control, progress: ProgressThrottle
    ) -> None:
        super().__init__(name="secateurs-heartbeat", daemon=True)
        self.s, self.t, self.j, self.a, self.ctl, self.progress = settings, tenant_id, job_id, attempt, ctl, progress
        self.done = threading.Event()

    def run(self) -> None:
        renew_every = max(0.2, self.s.lease_seconds / 3)
        tick = min(renew_every, max(0.1, self.s.progress_event_interval_seconds))
        renewed = time.monotonic()
        while not self.done.wait(tick):
            try:
                self.progress.flush_due()
                if time.monotonic() - renewed >= renew_every:
                    renewed = time.monotonic()
                    with session_scope(self.s.db_url) as sess:
                        self.ctl.update(execution.heartbeat(sess, self.t, self.j, self.a, self.s.lease_seconds))
            except Exception:
                log.exception("heartbeat failed for %s", self.j)


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


SUMMARY_KEYS = (
    "achieved_sparsity",
    "perplexity",
    "tasks",
    "timings",
    "model",
    "device",
    "block_sparsity",
    "pruned_weights",
    "damping_retries",
    "memory",
    "structure",
    "sweep",
    "recovery",
    "gradual",
)


def summarize(metrics: dict[str, Any]) -> dict[str, Any]:
    """The job's metrics summary; the full report (per layer) is the metrics.json artifact."""
    summary = {k: metrics[k] for k in SUMMARY_KEYS if k in metrics}
    if summary.get("recovery"):  # each run's own loss curve stays in metrics.json
        summary["recovery"] = {k: v for k, v in summary["recovery"].items() if k != "runs"}
    return _jsonable(summary)


def _fetch_set(settings: Settings, storage: Storage, tenant_id: str, ref: str, dest: Path, *, as_text: bool) -> Path:
    set_id = ref.removeprefix("uploaded:")
    with session_scope(settings.db_url) as sess:
        cs = CalibrationSetRepository(sess, tenant_id).get(set_id)
        if cs is None:
            raise PruningError(f"calibration set {set_id} no longer exists")
        key, fmt = cs.storage_key, cs.format
    path = storage.get_file(key, dest / f"{set_id}.{fmt}")
    if as_text and fmt == "jsonl":
        txt = path.with_suffix(".txt")
        txt.write_text("\n\n".join(parse_documents(path.read_text("utf-8"), jsonl=True)), "utf-8")
        return txt
    return path


def prepare_config(
    settings: Settings, storage: Storage, tenant_id: str, raw: dict[str, Any], work: Path
) -> PruneConfig:
    """Turn the stored config into one the engine can run locally (downloads s3:// models and sets)."""
    data = json.loads(json.dumps(raw))
    inputs = work / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    model = data["model"]
    if model.startswith("s3://"):
        from core.storage.s3 import S3Storage

        s3 = storage if isinstance(storage, S3Storage) else S3Storage.from_settings(settings)
        try:
            data["model"] = str(s3.download_uri(model, inputs / "model"))
        except StorageError as e:
            from core.pruning.errors import ModelNotFoundError

            raise ModelNotFoundError(str(e)) from e
    elif model.startswith("file://"):
        data["model"] = model.removeprefix("file://")
    cal = data.get("calibration") or {}
    if str(cal.get("source", "")).startswith("uploaded:"):
        cal["source"] = str(_fetch_set(settings, storage, tenant_id, cal["source"], inputs, as_text=False))
    ev = data.get("evaluation")
    ev_ref = str((ev or {}).get("source") or "")
    if ev and ev_ref.startswith("uploaded:"):
        ev["source"] = str(_fetch_set(settings, storage, tenant_id, ev["source"], inputs, as_text=True))
    rc = data.get("recovery")
    if rc and str(rc.get("source") or "").startswith("uploaded:"):
        if rc["source"] == ev_ref and ev:  # the very file evaluation reads: its windows are kept out of training
            rc["source"] = ev["source"]
        else:
            rc["source"] = str(_fetch_set(settings, storage, tenant_id, rc["source"], inputs, as_text=False))
    data["device"] = settings.device
    return PruneConfig.model_validate(data)


def _error_of(e: BaseException) -> tuple[str, str]:
    if isinstance(e, PruningError):
        return e.code, str(e) or e.__class__.__name__
    if isinstance(e, MemoryError):
        return "out_of_memory", "out of host memory"
    try:
        import torch

        if isinstance(e, torch.OutOfMemoryError):
            return "out_of_memory", str(e).splitlines()[0] if str(e) else "CUDA out of memory"
    except ImportError:  # pragma: no cover
        pass
    try:
        from celery.exceptions import SoftTimeLimitExceeded

        if isinstance(e, SoftTimeLimitExceeded):
            return "timeout", "the job exceeded its time limit"
    except ImportError:  # pragma: no cover
        pass
    if isinstance(e, StorageError):
        return "storage_error", str(e)
    return "internal_error", f"{e.__class__.__name__}: {e}"


def _claim(settings: Settings, tenant_id: str, job_id: str, worker_id: str) -> tuple[execution.Claim, dict[str, Any]]:
    def once() -> tuple[execution.Claim, dict[str, Any]]:
        with session_scope(settings.db_url) as sess:
            c = execution.claim(sess, tenant_id, job_id, worker_id, settings.lease_seconds)
            return c, dict(c.job.config) if c.job is not None else {}

    try:
        return retry_while_unavailable(once, seconds=settings.database_retry_seconds, what=f"claim {job_id}")
    except DATABASE_UNAVAILABLE as e:
        raise ClaimUnavailable(f"database unavailable: {e.__class__.__name__}") from e


def _finish(settings: Settings, tenant_id: str, job_id: str, attempt: int, **kw: Any) -> str | None:
    """``execution.finish``, riding out a database outage: a finished job's outcome is worth waiting for."""

    def once() -> str | None:
        with session_scope(settings.db_url) as sess:
            status = execution.finish(sess, tenant_id, job_id, attempt, **kw)
            if status is None:  # a commit that failed on the wire may have landed: then the job ended with us
                status = execution.ended_by(sess, tenant_id, job_id, attempt)
            return status

    return retry_while_unavailable(once, seconds=settings.database_retry_seconds, what=f"finish {job_id}")


def run_job(settings: Settings, tenant_id: str, job_id: str, worker_id: str) -> str:
    url = settings.db_url
    c, raw = _claim(settings, tenant_id, job_id, worker_id)
    if c.outcome != "claimed":
        log.info("job %s: not run (%s: %s)", job_id, c.outcome, c.reason)
        return c.outcome
    attempt = c.attempt
    log.info("job %s: attempt %d claimed by %s", job_id, attempt, worker_id)
    ctl = _Control()

    def report(**what: Any) -> None:
        """Progress and log events are best effort: while the database is unreachable they are dropped (the
        heartbeat keeps trying to hold the lease) rather than failing a job that is otherwise fine."""
        try:
            with session_scope(url) as sess:
                ctl.update(execution.report(sess, tenant_id, job_id, attempt, settings.lease_seconds, **what))
        except DATABASE_UNAVAILABLE as e:
            log.warning("job %s: report dropped, database unavailable (%s)", job_id, e.__class__.__name__)

    progress = ProgressThrottle(
        lambda prog, data: report(progress=prog, event=None if data is None else ("progress", data)),
        settings.progress_event_interval_seconds,
    )
    hb = _Heartbeat(settings, tenant_id, job_id, attempt, ctl, progress)
    hb.start()
    storage = make_storage(settings)
    prefix = keys.attempt_prefix(tenant_id, job_id, attempt)
    work = settings.work_path / job_id / f"attempt-{attempt}"
    if work.exists():
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    def note(message: str, level: str = "info") -> None:
        progress.flush()  # keep the events in the order they happened
        report(event=("log", {"level": level, "message": message}))

    run_fraction = RunFraction(["load"])  # replaced by the config's plan once the config is read

    def on_progress(p: Any) -> None:
        frac = run_fraction(p)
        eta = None
        if frac:
            elapsed = time.monotonic() - t0
            eta = round(elapsed / frac * (1 - frac), 1)
        prog = {
            "stage": p.stage,
            "message": p.message or None,
            "block": p.block,
            "total_blocks": p.total_blocks,
            "fraction": frac,
            "eta_seconds": eta,
        }
        data = {k: v for k, v in prog.items() if v is not None}
        if getattr(p, "data", None):
            data["data"] = _jsonable(p.data)
        progress.offer(prog, data)

    def finish(**outcome: Any) -> str | None:
        progress.flush()  # the last progress report, before the terminal status
        return _finish(settings, tenant_id, job_id, attempt, **outcome)

    def should_stop() -> bool:
        return ctl.stop

    resume_prefix = keys.resume_prefix(tenant_id, job_id)

    def drop_resume(status: str | None) -> None:
        """Once the job has ended, whatever the outcome, its resume checkpoint goes (a lost attempt's stays
        for the next one; the sweeper removes what an ended job left)."""
        if status in ("succeeded", "failed", "cancelled"):
            try:
                storage.delete_prefix(resume_prefix)
            except Exception:
                log.exception("cleanup of %s failed", resume_prefix)

    try:
        try:
            config = prepare_config(settings, storage, tenant_id, raw, work)
            run_fraction = RunFraction(planned_stages(config))
            note(f"attempt {attempt} started on {worker_id}")
            from core.pruning.checkpoints import ResumeSpec
            from core.pruning.run import prune

            resume = ResumeSpec(
                work / "resume",
                storage=storage,
                prefix=resume_prefix,
                identity={k: v for k, v in raw.items() if k not in ("export", "evaluation", "device")},
                note=note,
            )
            result = prune(config, work / "out", on_progress=on_progress, should_stop=should_stop, resume=resume)
            if ctl.lost:
                raise JobLost()
            if ctl.cancel:
                raise Cancelled("cancelled after the last block")
            arts: list[Artifact] = []
            out_dir = Path(result.out_dir)
            note(f"uploading {len(result.files)} artifacts to {storage.kind} storage")
            for f in result.files:
                info = storage.put_file(keys.artifact(tenant_id, job_id, attempt, f.name), out_dir / f.name)
                if getattr(f, "sha256", None) and f.sha256 != info.sha256:
                    raise StorageError(f"sha256 of {f.name} changed during upload")
                arts.append(
                    Artifact(
                        tenant_id=tenant_id,
                        job_id=job_id,
                        attempt=attempt,
                        name=f.name,
                        kind=str(getattr(f, "kind", "file")),
                        size=info.size,
                        sha256=info.sha256,
                        storage_key=info.key,
                    )
                )
                if ctl.lost:
                    raise JobLost()
            status = _finish(
                settings,
                tenant_id,
                job_id,
                attempt,
                outcome="succeeded",
                artifacts=arts,
                metrics=summarize(result.metrics),
            )
            if status != "succeeded":
                storage.delete_prefix(prefix)
            drop_resume(status)
            log.info("job %s: attempt %d -> %s", job_id, attempt, status)
            return status or "lost"
        except JobLost:
            log.warning("job %s: attempt %d lost its lease; stopping", job_id, attempt)
            storage.delete_prefix(prefix)
            return "lost"
        except Cancelled:
            storage.delete_prefix(prefix)
            status = finish(outcome="cancelled")
            drop_resume(status)
            return status or "lost"
        except BaseException as e:
            code, message = _error_of(e)
            if code == "internal_error":
                log.exception("job %s failed", job_id)
            else:
                log.warning("job %s failed: %s: %s", job_id, code, message)
            try:
                storage.delete_prefix(prefix)
            except Exception:
                log.exception("cleanup of %s failed", prefix)
            status = finish(outcome="failed", error=(code, message))
            drop_resume(status)
            if not isinstance(e, Exception):
                raise
            return status or "lost"
    finally:
        hb.done.set()
        shutil.rmtree(work, ignore_errors=True)
