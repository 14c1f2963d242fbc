"""Artifact storage behind one small interface: a local directory or an S3-compatible bucket."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.settings import Settings

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str


class StorageError(Exception):
    pass


def check_key(key: str) -> str:
    """Keys are relative posix paths without '..', '.' or empty parts."""
    p = PurePosixPath(key)
    if not key or key.startswith("/") or "\\" in key or any(part in ("", ".", "..") for part in key.split("/")):
        raise StorageError(f"invalid storage key {key!r}")
    return str(p)


class Storage(ABC):
    kind: str

    @abstractmethod
    def put_file(self, key: str, path: Path) -> ObjectInfo: ...

    @abstractmethod
    def get_file(self, key: str, dest: Path) -> Path: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]: ...

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int: ...

    def local_path(self, key: str) -> Path | None:
        """Filesystem path of an object when the backend is local (streamed with Range), else None."""
        return None

    def presigned_url(self, key: str, *, filename: str | None = None, expires: int = 300) -> str | None:
        """Short-lived URL for a direct download, when the backend has one."""
        return None

    @abstractmethod
    def check(self) -> None:
        """Raise StorageError when the backend is unreachable."""


def make_storage(settings: Settings) -> Storage:
    if settings.storage_backend == "s3":
        from core.storage.s3 import S3Storage

        return S3Storage.from_settings(settings)
    from core.storage.local import LocalStorage

    return LocalStorage(settings.artifacts_path)
