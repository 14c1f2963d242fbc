"""Uploaded calibration sets: .txt (one document per blank-line-separated paragraph, or the whole file)
or .jsonl (one object per line with a string ``text`` field, or a JSON string per line)."""

from __future__ import annotations

import builtins
import hashlib
import tempfile
from pathlib import Path
from typing import BinaryIO

from sqlalchemy.orm import Session

from core.db.ids import new_id
from core.db.models import CalibrationSet
from core.db.repositories import CalibrationSetRepository
from core.errors import InvalidInput, NotFound, TooLarge
from core.pruning.texts import parse_documents
from core.storage import Storage, keys

FORMATS = {".txt": "txt", ".jsonl": "jsonl"}
MAX_NAME = 255  # characters of the stored file name (its database column)
# What a multipart request may carry besides the file (boundaries, part headers): the API refuses a request
# larger than the limit plus this before parsing it, and the upload below enforces the limit on the file.
MULTIPART_SLACK = 64 * 1024


def too_large(max_bytes: int) -> TooLarge:
    return TooLarge(f"calibration uploads are limited to {max_bytes} bytes")


def _bad(msg: str) -> InvalidInput:
    return InvalidInput(f"file: {msg}", errors=[{"loc": ["body", "file"], "msg": msg, "type": "value_error"}])


def _count_records(path: Path, fmt: str) -> int:
    try:
        docs = parse_documents(path.read_text("utf-8"), jsonl=fmt == "jsonl")
    except UnicodeDecodeError:
        raise _bad("must be UTF-8 text") from None
    except ValueError as e:
        raise _bad(str(e)) from None
    if fmt == "txt":  # paragraphs, for the record count shown to users
        return max(1, sum(1 for para in docs[0].split("\n\n") if para.strip()))
    return sum(1 for t in docs if t.strip())


def _name_and_format(filename: str | None) -> tuple[str, str]:
    """The stored name (the upload's last path segment) and the format its extension names."""
    name = Path(filename or "").name
    fmt = FORMATS.get(Path(name).suffix.lower())
    if fmt is None:
        raise _bad("must be a .txt or .jsonl file")
    if len(name) > MAX_NAME:
        raise _bad(f"file name must be at most {MAX_NAME} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise _bad("file name must not contain control characters")
    return name, fmt


class CalibrationSetService:
    def __init__(self, session: Session, tenant_id: str, storage: Storage, max_bytes: int) -> None:
        self.repo = CalibrationSetRepository(session, tenant_id)
        self.tenant_id = tenant_id
        self.storage = storage
        self.max_bytes = max_bytes

    def upload(self, stream: BinaryIO, filename: str | None) -> CalibrationSet:
        name, fmt = _name_and_format(filename)
        h = hashlib.sha256()
        size = 0
        with tempfile.TemporaryDirectory() as td:
            tmp = Path(td) / f"upload.{fmt}"  # not the tenant's name: the OS has its own rules for names
            with open(tmp, "wb") as out:
                while chunk := stream.read(1024 * 1024):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise too_large(self.max_bytes)
                    h.update(chunk)
                    out.write(chunk)
            if size == 0:
                raise _bad("is empty")
            records = _count_records(tmp, fmt)
            set_id = new_id("cal")
            key = keys.calibration_set(self.tenant_id, set_id, fmt)
            self.storage.put_file(key, tmp)
        return self.repo.add(
            CalibrationSet(
                id=set_id,
                tenant_id=self.tenant_id,
                filename=name,
                format=fmt,
                size=size,
                sha256=h.hexdigest(),
                records=records,
                storage_key=key,
            )
        )

    def get(self, set_id: str) -> CalibrationSet:
        cs = self.repo.get(set_id)
        if cs is None:
            raise NotFound(f"no calibration set {set_id!r}")
        return cs

    def list(self, *, after: str | None, limit: int) -> tuple[builtins.list[CalibrationSet], bool]:
        return self.repo.list(after=after, limit=limit)
