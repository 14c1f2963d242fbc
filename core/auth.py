"""Tenants and API keys.

A key looks like ``sct_<id>_<secret>``: the id is the public lookup part (also the row's primary key),
and only HMAC-SHA256(secret_key, full key) is stored. Keys are bound to one tenant.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy.orm import Session

from core.db.ids import new_id
from core.db.models import ApiKey, Tenant
from core.db.repositories import TenantRepository
from core.errors import Conflict, InvalidInput, NotFound, Unauthorized

KEY_PREFIX = "sct"
KEY_RE = re.compile(r"^sct_([0-9a-f]{16})_([A-Za-z0-9_-]{32,64})$")


def hash_key(full_key: str, pepper: bytes) -> str:
    return hmac.new(pepper, full_key.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    key_id: str


def create_tenant(session: Session, name: str) -> Tenant:
    name = name.strip()
    if not name or len(name) > 200:
        raise InvalidInput.field(["name"], "must be 1-200 characters")
    repo = TenantRepository(session)
    if repo.by_name(name) is not None:
        raise Conflict(f"tenant {name!r} exists")
    return repo.add(Tenant(id=new_id("ten"), name=name))


def create_key(session: Session, tenant: str, pepper: bytes, name: str = "") -> tuple[ApiKey, str]:
    """Create a key for a tenant (id or name). Returns the row and the full key, shown only once."""
    repo = TenantRepository(session)
    t = repo.get(tenant) or repo.by_name(tenant)
    if t is None:
        raise NotFound(f"no tenant {tenant!r}")
    key_id = secrets.token_hex(8)
    full = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    row = repo.add_key(ApiKey(id=key_id, tenant_id=t.id, name=name, key_hash=hash_key(full, pepper)))
    return row, full


def authenticate(session: Session, header: str | None, pepper: bytes) -> Principal:
    if not header:
        raise Unauthorized("missing Authorization: Bearer <api key>")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("use Authorization: Bearer <api key>")
    m = KEY_RE.match(token)
    if not m:
        raise Unauthorized("malformed API key")
    row = TenantRepository(session).key(m.group(1))
    if row is None or row.revoked_at is not None or not hmac.compare_digest(row.key_hash, hash_key(token, pepper)):
        raise Unauthorized("invalid API key")
    return Principal(row.tenant_id, row.id)
