"""The web dashboard in a real browser: headless Chromium (Debian's package, driven by Playwright's Python API)
against the real API (uvicorn) and a real Celery worker on Postgres + Redis (tests/remote_stack.py).

The user's path: enter the key, upload a calibration set, get a field-named error for a bad form, submit a job
from the form, watch its progress bar move over the event stream to 100 %, see one bar per block, the
perplexities, download an artifact (its bytes' sha256 equals the API's), cancel another job; and no JavaScript
error or Content-Security-Policy violation on the way.

Screenshots go to ``$SECATEURS_TEST_ARTIFACTS/dashboard`` (or the test's tmp dir); with
``SECATEURS_DASHBOARD_SCREENSHOT=docs/dashboard-job.png`` the job page's screenshot is also written there (the
README's picture)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, require
from tests.remote_stack import RemoteStack

pytestmark = pytest.mark.slow
CHROMIUM = os.environ.get("SECATEURS_CHROMIUM", "/usr/bin/chromium")

# Every Content-Security-Policy violation and uncaught error, recorded in the page from its first script on.
WATCH = """
window.__violations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__violations.push(`${e.violatedDirective} ${e.blockedURI} ${e.sourceFile}:${e.lineNumber}`);
});
window.__progress = [];
new MutationObserver((records) => {
  for (const r of records) {
    if (r.target.id === "job-progress") window.__progress.push(r.target.getAttribute("value"));
  }
}).observe(document, { subtree: true, attributes: true, attributeFilter: ["value"] });
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require(os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} not found (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "the playwright package is missing (pip install -e '.[test]')")
        raise
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    root = os.environ.get("SECATEURS_TEST_ARTIFACTS")
    d = Path(root) / "dashboard" if root else tmp_path / "screenshots"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _artifacts_to_s3(rs: RemoteStack, job_id: str) -> None:
    """The job's artifacts, copied into the bucket the second API serves them from (under the same keys)."""
    from tests.remote_stack import BUCKET

    rs.copy_artifacts_to_s3(job_id)
    s3 = rs.s3()
    rule = {"AllowedOrigins": [rs.s3_base], "AllowedMethods": ["GET"], "AllowedHeaders": ["*"]}
    s3.client.put_bucket_cors(Bucket=BUCKET, CORSConfiguration={"CORSRules": [rule]})


def test_dashboard_in_a_browser(remote_stack: RemoteStack, browser: Any, shots: Path) -> None:  # noqa: PLR0915
    from playwright.sync_api import expect

    expect.set_options(timeout=20_000)  # two shared cores: the first job request imports the methods
    rs = remote_stack
    t0 = time.monotonic()
    blocks = json.loads((rs.model / "config.json").read_text())["num_hidden_layers"]
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    ctx.set_default_timeout(20_000)
    page = ctx.new_page()
    page.add_init_script(WATCH)
    console: list[str] = []
    errors: list[str] = []
    page.on("console", lambda m: console.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        # the page and its headers
        resp = page.goto(rs.base + "/dashboard")  # redirected to /dashboard/
        assert resp is not None and resp.ok and page.url == rs.base + "/dashboard/"
        csp = resp.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert resp.headers["x-content-type-options"] == "nosniff"
        assert resp.headers["referrer-policy"] == "no-referrer"

        # a refused key, then the right one (kept in the tab's sessionStorage)
        page.get_by_label("API key").fill("sct_not_a_key")
        page.get_by_role("button", name="Use this key").click()
        expect(page.locator("#key-form .problem")).to_contain_text("401")
        page.get_by_label("API key").fill(rs.key)
        page.get_by_role("button", name="Use this key").click()
        expect(page.locator("table#jobs")).to_be_visible()
        assert page.evaluate("sessionStorage.getItem('secateurs.apiKey')") == rs.key

        # upload a calibration set from the form; it is listed and chosen
        page.get_by_role("link", name="New job").first.click()
        with rs.http() as c:  # the stack is shared: other tests uploaded sets of the same name before
            known = {x["id"] for x in c.get("/v1/calibration-sets", params={"limit": 100}).json()["data"]}
        page.set_input_files("#f-upload", str(rs.cal_file))
        page.locator("#upload-set").click()
        rows = page.locator("#calibration-sets tr[data-set-id]")
        expect(rows).to_have_count(len(known) + 1)
        new_ids = {rows.nth(i).get_attribute("data-set-id") for i in range(rows.count())} - known
        assert len(new_ids) == 1, new_ids
        set_id = new_ids.pop()
        expect(page.locator(f"#calibration-sets tr[data-set-id='{set_id}']")).to_contain_text(rs.cal_file.name)
        expect(page.locator("#f-cal-set")).to_have_value(set_id)
        expect(page.locator("#cal-set")).to_be_checked()

        # a bad form: the API's problem is shown with the field it names, and the field is marked
        page.locator("#f-model").fill(str(rs.model))
        page.locator("#f-method").select_option("wanda")
        page.locator("#f-sparsity").fill("1.5")
        page.locator("#f-nsamples").fill("4")
        page.locator("#f-seqlen").fill("32")
        page.locator("#f-eval").select_option(f"set:{set_id}")
        page.locator("#f-eval-windows").fill("4")
        page.locator("#create-job").click()
        expect(page.locator("#form-errors .problem li[data-field='sparsity']")).to_be_visible()
        expect(page.locator("#f-sparsity")).to_have_attribute("aria-invalid", "true")

        # the job, from the form
        page.locator("#f-sparsity").fill("0.5")
        page.locator("#create-job").click()
        page.wait_for_url(re.compile(r".*#/jobs/job_[0-9a-f]+$"))
        job_id = page.url.rsplit("/", 1)[1]
        progress = page.locator("#progress")
        expect(progress).to_have_attribute("data-fraction", "1", timeout=90_000)
        expect(page.locator("h2 + span .status")).to_have_text("succeeded")
        expect(page.locator("#job-progress-pct")).to_have_text("100 %")
        seen = [float(v) for v in page.evaluate("window.__progress") if v is not None]
        assert any(0 < v < 1 for v in seen), f"the bar never showed a point between 0 and 1: {seen}"
        assert int(progress.get_attribute("data-sse-events") or 0) > 0  # moved by the event stream

        # the chart (a bar per block) and the perplexities
        expect(page.locator("#block-chart rect[data-block]")).to_have_count(blocks)
        for sel in ("#ppl-dense", "#ppl-pruned"):
            assert float(page.locator(sel).inner_text()) > 0

        # an artifact: the bytes downloaded by the page are the bytes the API lists
        with rs.http() as c:
            listed = {a["name"]: a for a in c.get(f"/v1/pruning-jobs/{job_id}/artifacts").json()["data"]}
        name = max((n for n in listed if n.endswith(".safetensors")), key=lambda n: listed[n]["size"])
        expect(page.locator("#artifacts tr[data-artifact]")).to_have_count(len(listed))
        page.locator("#artifacts").scroll_into_view_if_needed()
        with page.expect_download() as dl:
            page.locator(f"#artifacts button[data-artifact='{name}']").click()
        saved = shots / name.replace("/", "_")
        dl.value.save_as(saved)
        assert dl.value.suggested_filename == name.rsplit("/", 1)[-1]
        assert _sha256(saved) == listed[name]["sha256"]
        expect(page.locator(f"#artifacts tr[data-artifact='{name}'] [data-verified='true']")).to_be_visible()

        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(shots / "dashboard-job.png"), full_page=True)
        if target := os.environ.get("SECATEURS_DASHBOARD_SCREENSHOT"):
            dest = Path(target) if Path(target).is_absolute() else ROOT / target
            shutil.copyfile(shots / "dashboard-job.png", dest)

        # S3 storage (the second API, same database): the download answers 307 to a presigned URL on the
        # storage's origin, which the page follows without the key (the CSP's connect-src names that origin;
        # the bucket's CORS rules allow the dashboard's)
        _artifacts_to_s3(rs, job_id)
        resp = page.goto(f"{rs.s3_base}/dashboard/#/jobs/{job_id}")
        assert resp is not None
        assert rs.s3_proxy.url in resp.headers["content-security-policy"]
        page.get_by_label("API key").fill(rs.key)  # another origin: another sessionStorage
        page.get_by_role("button", name="Use this key").click()
        with page.expect_download() as dl:
            page.locator(f"#artifacts button[data-artifact='{name}']").click()
        dl.value.save_as(saved)
        assert _sha256(saved) == listed[name]["sha256"]
        heads = rs.s3_proxy.requests(f"/jobs/{job_id}/attempt-1/{name}?")
        assert heads and all("authorization" not in h.lower() and rs.key not in h for h in heads)

        # the jobs list shows it, finished
        page.get_by_role("link", name="Jobs", exact=True).click()
        expect(page.locator(f"tr[data-job-id='{job_id}'] .status")).to_have_text("succeeded")
        page.screenshot(path=str(shots / "dashboard-jobs.png"), full_page=True)

        # cancel: a job that stays queued (created through the second API, whose queue no worker reads)
        with httpx.Client(base_url=rs.s3_base, headers={"Authorization": f"Bearer {rs.key}"}) as c:
            r = c.post("/v1/pruning-jobs", json=rs.job_body(metadata={"case": "dashboard-cancel"}))
            assert r.status_code == 201, r.text
            parked = r.json()["id"]
        page.goto(f"{rs.base}/dashboard/#/jobs/{parked}")
        expect(page.locator("h2 + span .status")).to_have_text("queued")
        page.get_by_role("button", name="Cancel job").click()
        expect(page.locator("h2 + span .status")).to_have_text("cancelled")
        expect(page.locator("#cancel-job")).to_be_hidden()
        page.screenshot(path=str(shots / "dashboard-cancelled.png"), full_page=True)

        violations = page.evaluate("window.__violations")
        assert violations == [], violations
        assert errors == [], errors
        # the two refusals the test asked for (the bad key, the bad form) are the only failed requests
        unexpected = [m for m in console if not re.search(r"status of (401|422)", m)]
        assert unexpected == [], unexpected
        assert time.monotonic() - t0 < 60
    except Exception:
        page.screenshot(path=str(shots / "failure.png"), full_page=True)
        print(rs.logs())
        raise
    finally:
        ctx.close()


def test_event_stream_resumes_after_a_cut(remote_stack: RemoteStack, api_proxy: Any, browser: Any) -> None:
    """The job page's event stream of a real job is cut in the middle of an event: the page recovers, shows no
    event twice, and its bar still reaches 100 %."""
    from playwright.sync_api import expect

    rs = remote_stack
    expect.set_options(timeout=60_000)
    with rs.http() as c:
        r = c.post("/v1/pruning-jobs", json=rs.job_body(metadata={"case": "dashboard-resume"}))
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
    # the first stream ends inside its second progress event (after its `event:` line, before its data)
    api_proxy.arm("/events/stream", "cut", pattern=b"event: progress", count=2)
    ctx = browser.new_context()
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(f"{api_proxy.url}/dashboard/#/jobs/{job_id}")
        page.get_by_label("API key").fill(rs.key)
        page.get_by_role("button", name="Use this key").click()
        expect(page.locator("#progress")).to_have_attribute("data-fraction", "1")
        heads = api_proxy.requests(f"/v1/pruning-jobs/{job_id}/events/stream")
        assert heads and "last-event-id:" not in heads[0].lower()
        # After the cut the page asks for the job again and, while it runs, follows it again from the last event
        # it had taken whole. The worker is fast: the job may have ended by then (nothing to follow), or its
        # whole history may have come in one burst with the cut, which the browser can drop with the connection
        # (then the page rightly asks from the start). The exact header is checked on canned streams in
        # test_a_stream_cut_mid_event_resumes_with_last_event_id.
        resumed = [re.search(r"(?im)^last-event-id:\s*(\d+)", h) for h in heads[1:]]
        assert all(m is None or int(m.group(1)) >= 1 for m in resumed), heads
        statuses = page.locator("#events li[data-type='status']").all_inner_texts()
        assert [t.split("status: ")[1] for t in statuses] == ["queued", "running", "succeeded"], statuses
        assert errors == []
    finally:
        ctx.close()


CANNED_ORIGIN = "http://dashboard.test"


@contextmanager
def _canned_dashboard(
    browser: Any, sqlite_database: str, tmp_path: Path, answer: Callable[[str, Any], bool], **context: Any
) -> Iterator[tuple[Any, list[str]]]:
    """A page whose dashboard files and headers come from the app in process, and whose API requests are
    answered by `answer(path, route)` (it fulfils the route and returns True, or leaves it to a 404)."""
    from fastapi.testclient import TestClient
    from playwright.sync_api import Route

    from api.app import create_app
    from core.settings import Settings

    s = Settings(_env_file=None, env="test", data_dir=tmp_path / "var", database_url=sqlite_database, broker_url=None)
    with TestClient(create_app(s)) as app:

        def serve(route: Route) -> None:
            path = route.request.url.removeprefix(CANNED_ORIGIN).split("?")[0]
            if path.startswith("/dashboard"):
                r = app.get(path, follow_redirects=False)
                route.fulfill(status=r.status_code, headers=dict(r.headers), body=r.content)
            elif not answer(path, route):
                route.fulfill(status=404, json={"title": "Not Found", "status": 404})

        ctx = browser.new_context(**context)
        page = ctx.new_page()
        page.add_init_script(WATCH)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.route(f"{CANNED_ORIGIN}/**", serve)
        try:
            yield page, errors
        finally:
            ctx.close()


def test_a_stream_cut_mid_event_resumes_with_last_event_id(browser: Any, sqlite_database: str, tmp_path: Path) -> None:
    """Canned streams, so the cut always falls after two whole events: the page asks again with
    `Last-Event-ID: 2`, takes the events after it, never shows one twice, and ends at 100 %."""
    from playwright.sync_api import expect

    expect.set_options(timeout=15_000)

    def event(seq: int, type_: str, data: dict[str, Any]) -> str:
        body = {"id": seq, "type": type_, "created_at": "2026-01-01T00:00:00Z", "data": data}
        return f"id: {seq}\nevent: {type_}\ndata: {json.dumps(body)}\n\n"

    first = event(1, "status", {"status": "running"}) + event(2, "progress", {"stage": "prune", "fraction": 0.4})
    first += "id: 3\nevent: progress\n"  # cut here, inside the third event
    second = event(3, "progress", {"stage": "prune", "fraction": 0.8}) + event(4, "status", {"status": "succeeded"})
    streams: list[str | None] = []
    state = {"status": "running"}

    def answer(path: str, route: Any) -> bool:
        if path == "/v1/pruning-jobs/job_cut/events/stream":
            streams.append(route.request.headers.get("last-event-id"))
            if len(streams) > 1:
                state["status"] = "succeeded"
            body = first if len(streams) == 1 else second
            route.fulfill(status=200, headers={"content-type": "text/event-stream"}, body=body)
        elif path == "/v1/pruning-jobs/job_cut":
            route.fulfill(status=200, json=_job("job_cut", state["status"], sparsity=0.5, pattern=None))
        elif path in ("/v1/pruning-jobs", "/v1/pruning-jobs/job_cut/artifacts"):
            route.fulfill(status=200, json={"object": "list", "data": [], "has_more": False})
        else:
            return False
        return True

    with _canned_dashboard(browser, sqlite_database, tmp_path, answer) as (page, errors):
        page.goto(f"{CANNED_ORIGIN}/dashboard/#/jobs/job_cut")
        page.get_by_label("API key").fill("sct_canned")
        page.get_by_role("button", name="Use this key").click()
        expect(page.locator("#progress")).to_have_attribute("data-fraction", "1")
        expect(page.locator("#progress")).to_have_attribute("data-sse-events", "4")  # 2 + 2, none twice
        assert streams[:2] == [None, "2"], streams
        statuses = page.locator("#events li[data-type='status']").all_inner_texts()
        assert [t.split("status: ")[1] for t in statuses] == ["running", "succeeded"], statuses
        assert errors == []


# --- what a real job cannot show yet: a sweep's curve (its shape as the sweep jobs write it) and a failure ---

SWEEP = {
    "points": [
        {"target": 0.3, "achieved_sparsity": 0.3, "perplexity": 6.2, "exported": False},
        {"target": 0.5, "achieved_sparsity": 0.5, "perplexity": 8.9, "exported": True},
        {"target": 0.7, "achieved_sparsity": 0.7, "perplexity": 41.5, "exported": False},
        {"target": "2:4", "achieved_sparsity": 0.5, "perplexity": 12.1, "exported": True},
        {"target": 0.9, "achieved_sparsity": 0.9, "perplexity": None, "exported": False},
    ],
    "dense_perplexity": 5.97,
}


def _job(job_id: str, status: str, **kw: Any) -> dict[str, Any]:
    return {
        "id": job_id,
        "object": "pruning_job",
        "status": status,
        "model": "org/<b>model</b>",  # shown as text, never parsed
        "method": "wanda",
        "sparsity": None,
        "pattern": "2:4",
        "attempt": 1,
        "max_attempts": 3,
        "cancel_requested": False,
        "timestamps": {"created_at": "2026-01-01T00:00:00Z", "finished_at": "2026-01-01T00:01:00Z"},
        "progress": None,
        "error": None,
        "metrics": None,
        "metadata": {"team": "<img src=x>"},
        "request": {},
        "urls": {},
        **kw,
    }


RECOVERED = {  # the shapes of a real job's summary (core/pruning/run.py, recovery.py, tasks.py)
    "achieved_sparsity": 0.5,
    "perplexity": {"dense": 6.73, "pruned": 52.7, "recovered": 7.36, "protocol": {"windows": 64, "seqlen": 256}},
    "recovery": {
        "config": {"mode": "full", "distill": False, "lr": 0.0003, "steps": 100},
        "steps": 100,
        "tokens_seen": 204800,
        "mask_violations": 0,
        "seconds": 91.2,
        "loss_curve": [
            {"step": 1, "loss": 3.9, "lr": 3e-05, "tokens": 2048},
            {"step": 25, "loss": 2.4, "lr": 0.0003, "tokens": 51200},
            {"step": 50, "loss": 2.1, "lr": 0.0002, "tokens": 102400},
            {"step": 100, "loss": 1.95, "lr": 0.0, "tokens": 204800},
        ],
    },
    "tasks": {
        "lm_eval_version": "0.4.9",
        "num_fewshot": 0,
        "limit": 100,
        "dense": {
            "tinystories_continuation": {"acc": 0.71, "acc_stderr": 0.0456, "acc_norm": 0.7, "acc_norm_stderr": 0.046}
        },
        "pruned": {
            "tinystories_continuation": {"acc": 0.52, "acc_stderr": 0.05, "acc_norm": 0.5, "acc_norm_stderr": 0.05}
        },
        "recovered": {
            "tinystories_continuation": {"acc": 0.62, "acc_stderr": 0.0488, "acc_norm": 0.6, "acc_norm_stderr": 0.049}
        },
    },
}


def test_sweep_curve_and_failure_pages(browser: Any, sqlite_database: str, tmp_path: Path) -> None:
    """The dashboard's own files and headers come from the app in process; the API's answers are canned."""
    from playwright.sync_api import expect

    expect.set_options(timeout=10_000)
    canned = {
        "/v1/pruning-jobs": {"object": "list", "data": [], "has_more": False},
        "/v1/pruning-jobs/job_sweep": _job(
            "job_sweep", "succeeded", metrics={"achieved_sparsity": 0.5, "sweep": SWEEP}
        ),
        "/v1/pruning-jobs/job_sweep/artifacts": {"object": "list", "data": []},
        "/v1/pruning-jobs/job_recovered": _job("job_recovered", "succeeded", metrics=RECOVERED),
        "/v1/pruning-jobs/job_recovered/artifacts": {"object": "list", "data": []},
        "/v1/pruning-jobs/job_failed": _job(
            "job_failed", "failed", error={"code": "out_of_memory", "message": "CUDA out of memory <script>"}
        ),
    }

    def answer(path: str, route: Any) -> bool:
        if path not in canned:
            return False
        assert route.request.headers.get("authorization") == "Bearer sct_canned"
        route.fulfill(status=200, json=canned[path])
        return True

    viewport = {"width": 1280, "height": 900}
    with _canned_dashboard(browser, sqlite_database, tmp_path, answer, viewport=viewport) as (page, errors):
        page.goto(f"{CANNED_ORIGIN}/dashboard/#/jobs/job_sweep")
        page.get_by_label("API key").fill("sct_canned")
        page.get_by_role("button", name="Use this key").click()
        chart = page.locator("#sweep-chart")
        expect(chart.locator("circle.point")).to_have_count(4)  # the point without a perplexity is not drawn
        expect(chart.locator("circle.point.exported")).to_have_count(2)
        expect(chart.locator("circle.nm[data-target='2:4']")).to_have_count(1)
        assert len(chart.locator("polyline.curve").get_attribute("points").split()) == 3  # the ratios only
        expect(chart.locator("line.reference")).to_have_count(1)  # the dense model's perplexity
        expect(page.locator("#sweep tbody tr")).to_have_count(5)
        expect(page.locator("#sweep tr[data-target='0.9']")).to_contain_text("—")
        expect(page.locator("#block-sparsity")).to_have_count(0)  # a sweep: a schedule per target, in its card
        assert page.locator("text=org/<b>model</b>").count() == 1 and page.locator("b").count() == 0
        page.screenshot(path=str(tmp_path / "sweep.png"), full_page=True)

        # recovery: the perplexity after it, its loss curve (a point per recorded step), the task table
        page.goto(f"{CANNED_ORIGIN}/dashboard/#/jobs/job_recovered")
        expect(page.locator("#ppl-recovered")).to_have_text("7.360")
        expect(page.locator("#perplexity rect[data-ppl]")).to_have_count(3)
        expect(page.locator("#loss-chart circle.point")).to_have_count(4)
        assert len(page.locator("#loss-chart polyline.curve").get_attribute("points").split()) == 4
        expect(page.locator("#recovery-steps")).to_have_text("100")
        expect(page.locator("#task-table thead th")).to_have_count(5)  # task, metric, dense, pruned, recovered
        expect(page.locator("#task-table tbody tr")).to_have_count(2)  # acc and acc_norm; stderr beside them
        expect(page.locator("#task-table tr[data-metric='acc']")).to_contain_text("0.6200 ± 0.049")
        page.screenshot(path=str(tmp_path / "recovered.png"), full_page=True)

        page.goto(f"{CANNED_ORIGIN}/dashboard/#/jobs/job_failed")
        expect(page.locator("#job-error")).to_contain_text("out_of_memory")
        expect(page.locator("#job-error")).to_contain_text("CUDA out of memory <script>")
        assert page.locator("img").count() == 0
        assert page.evaluate("window.__violations") == []
        assert errors == []


def test_a_real_sweep_job_draws_its_curve(remote_stack: RemoteStack, browser: Any, shots: Path) -> None:
    """A sweep job created from the form and run by the real worker: a target list refused by field first, then
    the list shows its targets in one cell, the job page its curve (a point per target, the exported ones
    filled, the dense line) and the per-target table."""
    from playwright.sync_api import expect

    expect.set_options(timeout=20_000)
    rs = remote_stack
    with rs.client() as c:
        text_set, _ = c.ensure_calibration_set(rs.cal_file)
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    page.add_init_script(WATCH)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(rs.base + "/dashboard/#/new")
        page.get_by_label("API key").fill(rs.key)
        page.get_by_role("button", name="Use this key").click()
        page.locator("#f-model").fill(str(rs.model))
        page.locator("#f-method").select_option("wanda")
        page.locator("#target-sweep").check()
        expect(page.locator("#f-sparsity")).to_be_disabled()
        page.locator("#f-sparsities").fill("0.3, 0.5, 0.7")
        page.locator("#f-patterns").fill("2:4")
        page.locator("#f-export").fill("0.4")  # not among the ratios: refused, naming the field
        page.locator("#f-cal-texts").fill(rs.text)
        page.locator("#f-nsamples").fill("4")
        page.locator("#f-seqlen").fill("32")
        page.locator("#f-eval").select_option(f"set:{text_set.id}")
        page.locator("#f-eval-windows").fill("4")
        page.locator("#create-job").click()
        expect(page.locator("#form-errors .problem li[data-field='export_sparsities']")).to_be_visible()
        expect(page.locator("#f-export")).to_have_attribute("aria-invalid", "true")
        page.locator("#f-export").fill("0.5")
        page.locator("#create-job").click()
        page.wait_for_url(re.compile(r".*#/jobs/job_[0-9a-f]+$"))
        job_id = page.url.rsplit("/", 1)[1]
        job = rs.wait_terminal(job_id)
        assert job["status"] == "succeeded", (job, rs.logs())
        req = job["request"]
        assert (req["sparsities"], req["patterns"], req["export_sparsities"]) == ([0.3, 0.5, 0.7], ["2:4"], [0.5])
        page.goto(rs.base + "/dashboard/#/jobs")
        expect(page.locator(f"#jobs tr[data-job-id='{job_id}']")).to_contain_text("30.0 %..70.0 % (3) + 2:4")
        page.goto(f"{rs.base}/dashboard/#/jobs/{job_id}")
        chart = page.locator("#sweep-chart")
        expect(chart.locator("circle.point")).to_have_count(4)
        expect(chart.locator("circle.point.exported")).to_have_count(1)
        expect(chart.locator("circle.nm[data-target='2:4']")).to_have_count(1)
        expect(chart.locator("line.reference")).to_have_count(1)
        assert len(chart.locator("polyline.curve").get_attribute("points").split()) == 3
        expect(page.locator("#sweep tbody tr")).to_have_count(4)
        expect(page.locator("#sweep tr[data-target='0.5']")).to_contain_text("yes")
        expect(page.locator("#block-sparsity")).to_have_count(0)
        expect(page.locator("#perplexity")).to_have_count(0)  # no "pruned: —" beside the sweep's own card
        page.screenshot(path=str(shots / "sweep-job.png"), full_page=True)
        assert page.evaluate("window.__violations") == []
        assert errors == []
    finally:
        ctx.close()
