"""The published OpenAPI document states what the server sends and what it enforces."""

from __future__ import annotations

PROBLEM = "application/problem+json"
PROBLEM_REF = "#/components/schemas/Problem"


def _operations(spec):  # noqa: ANN001, ANN202
    for path, item in spec["paths"].items():
        for method, op in item.items():
            yield f"{method.upper()} {path}", op


def test_every_error_response_is_a_problem_json_document(api):  # noqa: ANN001
    spec = api.client.get("/openapi.json").json()
    errors = 0
    for name, op in _operations(spec):
        for status, response in op["responses"].items():
            if status[0] not in "45":
                continue
            errors += 1
            assert list(response.get("content", {})) == [PROBLEM], (name, status, response)
            assert response["content"][PROBLEM]["schema"] == {"$ref": PROBLEM_REF}, (name, status)
        assert "500" in op["responses"], name
    assert errors > 50
    schemas = spec["components"]["schemas"]
    assert "Problem" in schemas and "ProblemError" in schemas
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    assert "HTTPValidationError" not in str(spec)


def test_documented_error_headers(api):  # noqa: ANN001
    spec = api.client.get("/openapi.json").json()
    for name, op in _operations(spec):
        responses = op["responses"]
        if "503" in responses:
            assert "Retry-After" in responses["503"]["headers"], name
        if "401" in responses:
            assert "WWW-Authenticate" in responses["401"]["headers"], name
    db_routes = [op for name, op in _operations(spec) if " /v1/" in name]
    assert db_routes and all("503" in op["responses"] for op in db_routes)
    example = spec["paths"]["/v1/pruning-jobs"]["get"]["responses"]["503"]["content"][PROBLEM]["example"]
    assert example["code"] == "database_unavailable"


def test_the_event_stream_documents_only_what_it_sends(api):  # noqa: ANN001
    spec = api.client.get("/openapi.json").json()
    ok = spec["paths"]["/v1/pruning-jobs/{job_id}/events/stream"]["get"]["responses"]["200"]
    assert list(ok["content"]) == ["text/event-stream"]


def test_the_validation_problem_is_what_the_document_says(api):  # noqa: ANN001
    """A 422 the server sends validates against the documented Problem schema (with `errors`)."""
    import jsonschema

    spec = api.client.get("/openapi.json").json()
    _, h = api.tenant()
    r = api.client.post("/v1/pruning-jobs", json={"model": "org/m", "sparsity": 2}, headers=h)
    assert r.status_code == 422 and r.headers["content-type"].startswith(PROBLEM)
    schema = {**spec["components"]["schemas"]["Problem"], "components": spec["components"]}
    jsonschema.validate(r.json(), schema)
    assert r.json()["errors"][0]["loc"] == ["body", "sparsity"]


# --- what the schema allows is what the server takes ----------------------------------------------------------


def _validator(spec, schema):  # noqa: ANN001, ANN202
    """A JSON Schema 2020-12 validator of `schema`, its $refs read in the document (formats checked)."""
    import jsonschema

    root = {**schema, "components": spec["components"]}
    return jsonschema.Draft202012Validator(root, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


NOT_A_SET = "cal_" + "0" * 26
JOB_BODIES = [  # (what the body adds to {"model": "org/m"}, whether it is valid)
    ({"sparsity": 0.5}, True),
    ({"pattern": "2:4"}, True),
    ({"pattern": "unstructured", "sparsity": 0.3}, True),
    ({"structure": {"heads": 0.25}}, True),
    ({"structure": {"blocks": 0.1}, "pattern": "unstructured"}, True),
    ({"method": "sparsegpt", "pattern": "4:8", "method_options": {"percdamp": 0.1, "blocksize": 64}}, True),
    ({"method": "magnitude", "sparsity": 0.5, "method_options": {"magnitude_scope": "row"}}, True),
    ({"sparsity": 0.5, "method_options": {"wanda_alpha_search": True}}, True),
    ({"pattern": "2:4", "method_options": {"wanda_alpha_search": False}}, True),
    ({"sparsity": 0.5, "schedule": {"kind": "linear", "first": 0.1, "last": 0.6}}, True),
    ({"sparsity": 0.5, "schedule": {"kind": "explicit", "values": [0.5, 0.2]}}, True),
    ({"sparsity": 0.5, "pattern": "2:4", "schedule": {"kind": "uniform"}}, True),
    ({"model": "s3://bucket/llama/", "sparsity": 0.5}, True),
    ({"sparsity": 0.5, "calibration": {"texts": ["", "a text"], "nsamples": 4}}, True),
    ({"sparsity": 0.5, "calibration": {"source": "wikitext2", "texts": None}}, True),
    ({"sparsity": 0.5, "evaluation": {"source": "ptb", "max_windows": 2}}, True),
    ({"sparsity": 0.5, "exclude": ["lm_head", "^model\\.layers\\.0\\."], "overrides": {"mlp": 0.3}}, True),
    ({"sparsity": 0.5, "metadata": {"k" * 64: "v" * 512}}, True),
    ({"sparsities": [0.3, 0.5, 0.7]}, True),
    ({"patterns": ["2:4", "4:8"], "export_patterns": ["2:4"]}, True),
    ({"sparsities": [0.3, 0.5], "patterns": ["2:4"], "export_sparsities": [0.5]}, True),
    ({"sparsities": [0.5, 0.6], "schedule": {"kind": "owl"}}, True),
    ({"sparsities": [0.5], "pattern": "unstructured"}, True),
    ({"sparsities": [i / 20 for i in range(12)], "patterns": ["2:4", "1:4", "3:8", "1:8"]}, True),
    ({}, False),
    ({"pattern": "unstructured"}, False),
    ({"pattern": "4:2"}, False),
    ({"pattern": "2:2"}, False),
    ({"pattern": "0:4"}, False),
    ({"pattern": "2:4", "schedule": {"kind": "owl"}}, False),
    ({"structure": {"heads": 0.25}, "schedule": {"kind": "owl"}}, False),
    ({"sparsity": 0.5, "schedule": {"kind": "explicit"}}, False),
    ({"sparsity": 0.5, "schedule": {"kind": "explicit", "values": []}}, False),
    ({"sparsity": 0.5, "schedule": {"kind": "linear", "first": 0.1}}, False),
    ({"structure": {}}, False),
    ({"structure": {"heads": 0}}, False),
    ({"method": "magnitude", "sparsity": 0.5, "method_options": {"percdamp": 0.1}}, False),
    ({"method": "sparsegpt", "sparsity": 0.5, "method_options": {"percdamp": 0}}, False),
    ({"pattern": "2:4", "method_options": {"wanda_alpha_search": True}}, False),
    ({"sparsity": 0.5, "calibration": {"source": "c4", "texts": ["a"]}}, False),
    ({"sparsity": 0.5, "calibration": {"source": "c4", "calibration_set_id": NOT_A_SET}}, False),
    ({"sparsity": 0.5, "calibration": {"texts": [" \n\t", "\x1c"]}}, False),
    ({"sparsity": 0.5, "calibration": {"texts": []}}, False),
    ({"sparsity": 0.5, "calibration": {"source": "mine.txt"}}, False),
    ({"sparsity": 0.5, "calibration": {"calibration_set_id": "cal_nope"}}, False),
    ({"sparsity": 0.5, "evaluation": {"source": "c4", "calibration_set_id": NOT_A_SET}}, False),
    ({"sparsity": 0.5, "exclude": ["("]}, False),
    ({"sparsity": 0.5, "overrides": {"(": 0.3}}, False),
    ({"sparsity": 0.5, "overrides": {"mlp": 1.0}}, False),
    ({"model": "org/a..b", "sparsity": 0.5}, False),
    ({"model": "org/m/extra", "sparsity": 0.5}, False),
    ({"model": "s3://", "sparsity": 0.5}, False),
    ({"sparsity": 0.5, "metadata": {"": "v"}}, False),
    ({"sparsity": 0.5, "metadata": {str(i): "v" for i in range(17)}}, False),
    ({"sparsity": 0.5, "metadata": {"k": "v" * 513}}, False),
    ({"sparsities": [0.3], "sparsity": 0.5}, False),
    ({"patterns": ["2:4"], "pattern": "4:8"}, False),
    ({"sparsities": [0.3], "structure": {"heads": 0.25}}, False),
    ({"sparsities": []}, False),
    ({"sparsities": [0.3, 0.3]}, False),
    ({"sparsities": [1.0]}, False),
    ({"sparsities": [i / 20 for i in range(17)]}, False),
    ({"sparsities": [i / 20 for i in range(13)], "patterns": ["2:4"]}, False),
    ({"sparsities": [0.5], "patterns": ["2:4", "1:4", "3:8", "1:8", "1:16"]}, False),
    ({"patterns": ["4:2"]}, False),
    ({"patterns": ["2:4"], "schedule": {"kind": "linear", "first": 0.1, "last": 0.5}}, False),
    ({"patterns": ["2:4"], "method_options": {"wanda_alpha_search": True}}, False),
    ({"sparsity": 0.5, "export_sparsities": [0.5]}, False),
    ({"pattern": "2:4", "export_patterns": ["2:4"]}, False),
]


def test_the_job_schema_allows_the_bodies_the_server_takes(api):  # noqa: ANN001
    """PruneConfig's rules across fields (target, schedule, method options, calibration sources) are in the
    published schema: for each body, schema and server give the same answer."""
    spec = api.client.get("/openapi.json").json()
    validator = _validator(spec, spec["components"]["schemas"]["JobCreate"])
    _, h = api.tenant()
    disagree = []
    for extra, valid in JOB_BODIES:
        body = {"model": "org/m", **extra}
        in_schema = validator.is_valid(body)
        r = api.client.post("/v1/pruning-jobs", json=body, headers=h)
        assert r.status_code in (201, 422), (body, r.text)
        if (in_schema, r.status_code == 201) != (valid, valid):
            disagree.append((extra, in_schema, r.status_code, r.json().get("detail")))
    assert not disagree


def test_the_status_filter_schema_is_the_listing_s_reading(api):  # noqa: ANN001
    spec = api.client.get("/openapi.json").json()
    param = next(p for p in spec["paths"]["/v1/pruning-jobs"]["get"]["parameters"] if p["name"] == "status")
    validator = _validator(spec, param["schema"])
    _, h = api.tenant()
    values = {"queued": True, "queued,running": True, " queued , failed ,": True, ",": True, "": True}
    values |= {"nope": False, "queued,nope": False, "QUEUED": False, "queued running": False}
    for value, valid in values.items():
        r = api.client.get("/v1/pruning-jobs", params={"status": value}, headers=h)
        assert (validator.is_valid(value), r.status_code) == (valid, 200 if valid else 422), (value, r.text)
        if not valid:
            assert r.json()["detail"].startswith("status: ") and r.json()["errors"][0]["loc"] == ["query", "status"]


def _upload(api, headers, name: str, content: bytes):  # noqa: ANN001, ANN202
    """A multipart upload written out by hand: HTTP clients escape the characters these tests send."""
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n\r\n'.encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    ctype = f"multipart/form-data; boundary={boundary}"
    return api.client.post("/v1/calibration-sets", content=body, headers={**headers, "content-type": ctype})


def test_upload_names_the_schema_allows_are_the_ones_the_server_takes(api):  # noqa: ANN001
    import re

    spec = api.client.get("/openapi.json").json()
    upload = spec["paths"]["/v1/calibration-sets"]["post"]
    encoding = upload["requestBody"]["content"]["multipart/form-data"]["encoding"]["file"]
    pattern = re.compile(encoding["headers"]["Content-Disposition"]["schema"]["pattern"])
    _, h = api.tenant()
    names = {"a.txt": True, "A.TXT": True, "data.v2.JsonL": True, "x" * 251 + ".txt": True, "..txt": True}
    names |= {"a.csv": False, ".txt": False, "x" * 252 + ".txt": False, "a\tb.txt": False, "a.txt.gz": False}
    for name, valid in names.items():
        content = b'{"text": "some text"}\n' if name.lower().endswith(".jsonl") else b"some text"
        r = _upload(api, h, name, content)
        in_schema = bool(pattern.search(f'form-data; name="file"; filename="{name}"'))
        assert (in_schema, r.status_code) == (valid, 201 if valid else 422), (name, r.text)
    body = upload["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]
    file_part = _validator(spec, spec["components"]["schemas"][body]["properties"]["file"])
    for content, valid in {"some text": True, "": False, " \n\x1c\u3000": False}.items():
        r = _upload(api, h, "c.txt", content.encode())
        assert (file_part.is_valid(content), r.status_code) == (valid, 201 if valid else 422), (content, r.text)


def test_malformed_multipart_is_the_documented_400_problem(api):  # noqa: ANN001
    spec = api.client.get("/openapi.json").json()
    assert list(spec["paths"]["/v1/calibration-sets"]["post"]["responses"]["400"]["content"]) == [PROBLEM]
    _, h = api.tenant()
    ctype = "multipart/form-data; boundary=abc"
    r = api.client.post(
        "/v1/calibration-sets",
        content=b"--abc\r\nno header\r\n\r\nx\r\n--abc--\r\n",
        headers={**h, "content-type": ctype},
    )
    assert r.status_code == 400 and r.headers["content-type"].startswith(PROBLEM)
    assert r.json()["status"] == 400
