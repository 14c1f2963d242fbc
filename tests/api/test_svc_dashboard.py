"""The dashboard's files and headers, without a browser (tests/e2e/test_svc_dashboard_browser.py drives it in one):
served at /dashboard/ with a strict Content-Security-Policy, nothing inline, no HTML parsing of data in the
script, and shipped as package data."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.dashboard import STATIC, content_security_policy
from tests.conftest import ROOT


@pytest.fixture
def client(sqlite_database: str, tmp_path: Path) -> Iterator:  # noqa: ANN001
    from fastapi.testclient import TestClient

    from api.app import create_app
    from core.settings import Settings

    s = Settings(
        _env_file=None,
        env="test",
        data_dir=tmp_path / "var",
        database_url=sqlite_database,
        broker_url=None,
        result_backend=None,
        secret_key="test-secret",
    )
    with TestClient(create_app(s)) as c:
        yield c


def directives(csp: str) -> dict[str, list[str]]:
    out = {}
    for part in csp.split(";"):
        name, *values = part.split()
        out[name] = values
    return out


def test_served_with_security_headers(client) -> None:  # noqa: ANN001
    r = client.get("/dashboard", follow_redirects=False)
    assert r.status_code == 308 and r.headers["location"] == "dashboard/"  # relative: /dashboard/ here
    for path, media in [
        ("/dashboard/", "text/html"),
        ("/dashboard/app.js", "text/javascript"),
        ("/dashboard/app.css", "text/css"),
        ("/dashboard/missing.js", "application/problem+json"),
    ]:
        r = client.get(path)
        assert r.headers["content-type"].startswith(media), path
        assert r.status_code == (404 if "missing" in path else 200), path
        d = directives(r.headers["content-security-policy"])
        assert d["default-src"] == ["'self'"]
        assert d["script-src"] == ["'self'"] and d["style-src"] == ["'self'"]
        assert d["connect-src"] == ["'self'"]
        assert d["frame-ancestors"] == ["'none'"] and d["object-src"] == ["'none'"] and d["base-uri"] == ["'none'"]
        assert d["require-trusted-types-for"] == ["'script'"]
        assert not any("unsafe" in v for vs in d.values() for v in vs)
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
    # the API's own responses are left as they were; the dashboard is not part of the API's schema
    assert "content-security-policy" not in client.get("/healthz").headers
    assert not any(p.startswith("/dashboard") for p in client.get("/openapi.json").json()["paths"])


def test_s3_storage_lets_downloads_follow_the_presigned_redirect() -> None:
    from core.settings import Settings

    s = Settings(
        _env_file=None,
        storage_backend="s3",
        s3_bucket="b",
        s3_endpoint_url="http://minio:9000",
        s3_public_endpoint_url="https://files.example.com/some/prefix",
    )
    assert directives(content_security_policy(s))["connect-src"] == ["'self'", "https://files.example.com"]


def test_nothing_inline_and_no_html_parsing_of_data() -> None:
    html = (STATIC / "index.html").read_text()
    for tag in re.findall(r"<script\b[^>]*>", html):
        assert "src=" in tag, tag
    assert "<style" not in html and not re.search(r"\sstyle\s*=", html)
    assert not re.search(r"\son[a-z]+\s*=", html), "inline event handler"
    code = re.sub(r"(^|\s)//[^\n]*", "", (STATIC / "app.js").read_text())  # without its comments
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "Function(", ".style"):
        assert sink not in code, sink


def test_every_static_file_is_package_data() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = cfg["tool"]["setuptools"]["package-data"]["api.dashboard"]
    files = [p.relative_to(STATIC.parent).as_posix() for p in STATIC.rglob("*") if p.is_file()]
    assert {"static/index.html", "static/app.js", "static/app.css"} <= set(files)
    for f in files:
        assert any(fnmatch.fnmatch(f, pat) for pat in patterns), f
