"""The body of ``POST /v1/webhook-endpoints``."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.webhooks.addresses import MAX_URL_LENGTH

# What the schema states of a URL (the rest depends on where its host resolves: checked by the service).
WEBHOOK_URL = re.compile(r"^https?://[^\x00-\x20\x7f]+$")
DESCRIPTION = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"  # no control characters but tab, newline, return
EventType = Literal["job.succeeded", "job.failed", "job.cancelled", "job.progress"]
DEFAULT_EVENTS: list[EventType] = ["job.succeeded", "job.failed", "job.cancelled"]


def _utf8(v: str) -> str:
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid UTF-8 text") from None
    return v


class WebhookEndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        min_length=1,
        max_length=MAX_URL_LENGTH,
        description="where events are POSTed: https (http too outside production), a host whose addresses are "
        "all public (checked now and at every delivery), no credentials",
        examples=["https://example.com/hooks/secateurs"],
        json_schema_extra={"pattern": WEBHOOK_URL.pattern},
    )
    description: str = Field(
        "", max_length=500, examples=["search team: pruning results"], json_schema_extra={"pattern": DESCRIPTION}
    )
    event_types: list[EventType] = Field(
        default_factory=lambda: list(DEFAULT_EVENTS),
        min_length=1,
        max_length=4,
        json_schema_extra={"uniqueItems": True},
        description="the events this endpoint receives (default: the three terminal ones); `job.progress` is "
        "opt-in and coalesced (at most one per job per `SECATEURS_WEBHOOK_PROGRESS_INTERVAL_SECONDS`, with the "
        "newest progress); `webhook.test` pings always reach it",
    )

    @field_validator("url")
    @classmethod
    def _url_text(cls, v: str) -> str:
        if not WEBHOOK_URL.fullmatch(v):
            raise ValueError("must be an http:// or https:// URL without spaces or control characters")
        return _utf8(v)

    @field_validator("description")
    @classmethod
    def _description_text(cls, v: str) -> str:
        if not re.fullmatch(DESCRIPTION, v):
            raise ValueError("must not contain control characters")
        return _utf8(v)

    @field_validator("event_types")
    @classmethod
    def _distinct(cls, v: list[EventType]) -> list[EventType]:
        if len(set(v)) != len(v):
            raise ValueError("each event type at most once")
        return v
