"""Signing secrets: made, encrypted at rest, and used to sign deliveries the Standard Webhooks way.

A secret is ``whsec_`` + base64 of 32 random bytes. It is shown once (at creation or rotation) and stored only
as a Fernet token under a key derived (HKDF-SHA256) from ``SECATEURS_SECRET_KEY``.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Sequence
from datetime import datetime

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from standardwebhooks.webhooks import Webhook

SECRET_PREFIX = "whsec_"
_HKDF_INFO = b"secateurs webhook signing secrets v1"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


class SecretBox:
    """Encrypts and decrypts signing secrets with the service's secret key."""

    def __init__(self, secret_key: bytes) -> None:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(secret_key)
        self._fernet = Fernet(base64.urlsafe_b64encode(key))

    def seal(self, secret: str) -> str:
        return self._fernet.encrypt(secret.encode()).decode()

    def open(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise ValueError("a webhook secret cannot be decrypted: was SECATEURS_SECRET_KEY changed?") from None


def signature_header(secrets_: Sequence[str], webhook_id: str, timestamp: datetime, body: bytes) -> str:
    """The ``webhook-signature`` value: one ``v1,<base64>`` per secret, space separated (a receiver accepts the
    message when any of them verifies with the secret it holds)."""
    return " ".join(Webhook(s).sign(webhook_id, timestamp, body) for s in secrets_)
