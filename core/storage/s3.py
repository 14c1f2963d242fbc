"""S3-compatible backend (AWS, MinIO, moto) via boto3.

- The whole-file sha256 is computed here; multipart ETags/checksums are per part and useless for that.
- ``request_checksum_calculation="when_required"`` keeps boto3 >= 1.36 working with older MinIO.
- Presigned URLs are signed for the *public* endpoint, not the in-cluster host the service talks to.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from core.hashing import sha256_file
from core.storage import ObjectInfo, Storage, StorageError, check_key

if TYPE_CHECKING:
    from core.settings import Settings


class S3Storage(Storage):
    kind = "s3"

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        public_endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        addressing_style: str = "path",
        prefix: str = "",
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        cfg = Config(
            signature_version="s3v4",
            s3={"addressing_style": addressing_style},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"max_attempts": 3, "mode": "standard"},
        )
        common: dict[str, Any] = dict(
            region_name=region, aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key, config=cfg
        )
        self.client = boto3.client("s3", endpoint_url=endpoint_url, **common)
        self.public_client = (
            boto3.client("s3", endpoint_url=public_endpoint_url, **common) if public_endpoint_url else self.client
        )

    @classmethod
    def from_settings(cls, s: Settings) -> S3Storage:
        return cls(
            s.s3_bucket,
            endpoint_url=s.s3_endpoint_url,
            public_endpoint_url=s.s3_public_endpoint_url,
            region=s.s3_region,
            access_key_id=s.s3_access_key_id,
            secret_access_key=s.s3_secret_access_key.get_secret_value() if s.s3_secret_access_key else None,
            addressing_style=s.s3_addressing_style,
        )

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def put_file(self, key: str, path: Path) -> ObjectInfo:
        digest = sha256_file(path)
        size = path.stat().st_size
        try:
            self.client.upload_file(str(path), self.bucket, self._key(key), ExtraArgs={"Metadata": {"sha256": digest}})
        except (BotoCoreError, ClientError) as e:
            raise StorageError(f"upload of {key!r} failed: {e}") from e
        return ObjectInfo(key, size, digest)

    def get_file(self, key: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(self.bucket, self._key(key), str(dest))
        except (BotoCoreError, ClientError) as e:
            raise StorageError(f"download of {key!r} failed: {e}") from e
        return dest

    def download_uri(self, uri: str, dest_dir: Path) -> Path:
        """Copy every object under ``s3://bucket/prefix`` into ``dest_dir`` (used for s3:// models)."""
        rest = uri.removeprefix("s3://")
        bucket, _, prefix = rest.partition("/")
        prefix = prefix.strip("/")
        n = 0
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix + "/" if prefix else ""):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(prefix) + 1 :] if prefix else obj["Key"]
                    if not rel or rel.endswith("/"):
                        continue
                    target = dest_dir / check_key(rel)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    self.client.download_file(bucket, obj["Key"], str(target))
                    n += 1
        except (BotoCoreError, ClientError) as e:
            raise StorageError(f"cannot read {uri}: {e}") from e
        if n == 0:
            raise StorageError(f"nothing under {uri}")
        return dest_dir

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StorageError(str(e)) from e

    def list(self, prefix: str) -> list[str]:
        out: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            out += [o["Key"][len(self.prefix) :] for o in page.get("Contents", [])]
        return sorted(out)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self.prefix + k} for k in keys[i : i + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(keys)

    def presigned_url(self, key: str, *, filename: str | None = None, expires: int = 300) -> str | None:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key)}
        if filename:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        return self.public_client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires)

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as e:
            raise StorageError(f"bucket {self.bucket!r} not reachable: {e}") from e

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)
