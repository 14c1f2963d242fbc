"""Every path says which methods it takes: OPTIONS and 405 answer `Allow` with all of them (not only the first
route's), and HEAD is answered wherever GET is."""

from __future__ import annotations

import re

PROBLEM = "application/problem+json"


def _documented(api):  # noqa: ANN001, ANN202
    """{concrete path: methods the OpenAPI document declares for it}, path parameters filled in."""
    spec = api.client.get("/openapi.json").json()
    return {re.sub(r"\{[^}]+\}", "x", path): {m.upper() for m in ops} for path, ops in spec["paths"].items()}


def _allow(response):  # noqa: ANN001, ANN202
    return {m.strip() for m in response.headers["allow"].split(",")}


def test_options_lists_every_method_of_the_path(api):  # noqa: ANN001
    _, h = api.tenant()
    documented = _documented(api)
    assert documented["/v1/pruning-jobs"] == {"GET", "POST"}
    for path, methods in documented.items():
        r = api.client.options(path, headers=h)
        assert r.status_code == 204 and r.content == b"", (path, r.status_code)
        implied = {"OPTIONS"} | ({"HEAD"} if "GET" in methods else set())
        assert _allow(r) == methods | implied, path
    assert api.client.options("/v1/nothing", headers=h).status_code == 404


def test_a_method_the_path_lacks_is_405_with_allow(api):  # noqa: ANN001
    _, h = api.tenant()
    for path, methods in _documented(api).items():
        for method in {"GET", "POST", "PUT", "PATCH", "DELETE"} - methods:
            r = api.client.request(method, path, headers=h)
            assert r.status_code == 405, (method, path, r.status_code)
            assert r.headers["content-type"].startswith(PROBLEM)
            assert r.json()["status"] == 405 and r.json()["code"] == "method_not_allowed"
            assert _allow(r) >= methods | {"OPTIONS"}, (method, path)
            assert not _allow(r) & ({"GET", "POST", "PUT", "PATCH", "DELETE"} - methods), (method, path)


def test_head_is_get_without_the_body(api):  # noqa: ANN001
    _, h = api.tenant()
    body = {"model": "org/m", "sparsity": 0.5, "calibration": {"texts": ["hello world"]}}
    job = api.client.post("/v1/pruning-jobs", json=body, headers=h).json()
    for path in ("/v1/pruning-jobs", f"/v1/pruning-jobs/{job['id']}", "/v1/pruning-jobs/job_nope", "/healthz"):
        get, head = api.client.get(path, headers=h), api.client.head(path, headers=h)
        assert head.status_code == get.status_code, path
        assert head.content == b"", path
        for name in ("content-type", "content-length", "etag"):
            assert head.headers.get(name) == get.headers.get(name), (path, name)
    # a stream that would run until the job ends stops once the headers are out
    head = api.client.head(f"/v1/pruning-jobs/{job['id']}/events/stream", headers=h)
    assert head.status_code == 200 and head.headers["content-type"].startswith("text/event-stream")
    assert head.content == b""
    assert api.client.head("/v1/pruning-jobs", headers={}).status_code == 401
