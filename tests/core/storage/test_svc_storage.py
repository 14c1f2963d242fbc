"""Storage backends: local directory and S3 (moto's server over HTTP, reset per test)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import httpx
import pytest

from core.storage import StorageError
from core.storage.local import LocalStorage
from core.storage.s3 import S3Storage
from tests.service_fixtures import S3_CREDS


def _blob(tmp_path: Path, n: int = 300_000) -> tuple[Path, str]:
    data = os.urandom(n)
    p = tmp_path / "blob.bin"
    p.write_bytes(data)
    return p, hashlib.sha256(data).hexdigest()


@pytest.fixture
def local(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "root")


@pytest.fixture
def s3(s3_endpoint: str) -> S3Storage:
    st = S3Storage(
        "bucket-a",
        endpoint_url=s3_endpoint,
        public_endpoint_url="http://public.example:9000",
        **{
            "region": S3_CREDS["region"],
            "access_key_id": S3_CREDS["access_key_id"],
            "secret_access_key": S3_CREDS["secret_access_key"],
        },
    )
    st.ensure_bucket()
    return st


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest):  # noqa: ANN201
    return request.getfixturevalue(request.param)


def test_put_get_roundtrip_with_our_sha256(storage, tmp_path: Path):  # noqa: ANN001
    src, digest = _blob(tmp_path)
    info = storage.put_file("tenants/t/jobs/j/attempt-1/model.safetensors", src)
    assert info.sha256 == digest and info.size == src.stat().st_size
    assert storage.exists("tenants/t/jobs/j/attempt-1/model.safetensors")
    out = storage.get_file("tenants/t/jobs/j/attempt-1/model.safetensors", tmp_path / "dl" / "x")
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest


def test_list_and_delete_prefix(storage, tmp_path: Path):  # noqa: ANN001
    src, _ = _blob(tmp_path, 10)
    for k in ("p/a-1/x", "p/a-1/sub/y", "p/a-2/z"):
        storage.put_file(k, src)
    assert storage.list("p/a-1/") == ["p/a-1/sub/y", "p/a-1/x"]
    assert storage.delete_prefix("p/a-1/") == 2
    assert storage.list("p/") == ["p/a-2/z"]
    assert not storage.exists("p/a-1/x")


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a//b", "a/./b", ""])
def test_bad_keys_are_refused(storage, tmp_path: Path, key: str):  # noqa: ANN001
    src, _ = _blob(tmp_path, 10)
    with pytest.raises(StorageError):
        storage.put_file(key, src)


def test_check(storage):  # noqa: ANN001
    storage.check()


def test_local_exposes_paths_and_no_presigned_url(local: LocalStorage, tmp_path: Path):
    src, _ = _blob(tmp_path, 10)
    local.put_file("a/b", src)
    assert local.local_path("a/b") == (tmp_path / "root" / "a" / "b").resolve()
    assert local.presigned_url("a/b") is None
    assert not list((tmp_path / "root" / "a").glob(".upload-*"))


def test_local_objects_have_the_mode_the_umask_gives(local: LocalStorage, tmp_path: Path):
    src, _ = _blob(tmp_path, 10)
    old = os.umask(0o027)
    try:
        local.put_file("a/b", src)
    finally:
        os.umask(old)
    assert stat.S_IMODE(local.local_path("a/b").stat().st_mode) == 0o640


def test_s3_multipart_upload_still_has_whole_file_sha256(s3: S3Storage, tmp_path: Path):
    src, digest = _blob(tmp_path, 9 * 1024 * 1024)  # above boto3's 8 MiB multipart threshold
    info = s3.put_file("big", src)
    assert info.sha256 == digest
    head = s3.client.head_object(Bucket="bucket-a", Key="big")
    assert head["Metadata"]["sha256"] == digest
    assert "-" in head["ETag"]  # multipart ETag: not a checksum of the file


def test_s3_presigned_url_uses_public_endpoint_and_works(s3: S3Storage, s3_endpoint: str, tmp_path: Path):
    src, digest = _blob(tmp_path, 1000)
    s3.put_file("dir/file.bin", src)
    url = s3.presigned_url("dir/file.bin", filename="file.bin", expires=60)
    assert url.startswith("http://public.example:9000/bucket-a/dir/file.bin?")
    assert "X-Amz-Signature" in url
    # the same signature served by the in-cluster host (moto does not check the Host header)
    r = httpx.get(url.replace("http://public.example:9000", s3_endpoint))
    assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == digest


def test_s3_check_fails_for_missing_bucket(s3_endpoint: str):
    st = S3Storage(
        "missing-bucket",
        endpoint_url=s3_endpoint,
        region="us-east-1",
        access_key_id="testing",
        secret_access_key="testing",
    )
    with pytest.raises(StorageError):
        st.check()


def test_s3_download_uri(s3: S3Storage, tmp_path: Path):
    src, digest = _blob(tmp_path, 100)
    s3.put_file("models/m1/config.json", src)
    s3.put_file("models/m1/sub/w.bin", src)
    out = s3.download_uri("s3://bucket-a/models/m1", tmp_path / "m")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == ["config.json", "sub/w.bin"]
    with pytest.raises(StorageError):
        s3.download_uri("s3://bucket-a/models/none", tmp_path / "n")
