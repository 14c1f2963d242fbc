"""Path and query parameters shared by the routes, bounded so that anything the database cannot hold (NUL
bytes, control characters, integers past its columns) is refused as invalid input naming the parameter."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query

from core.jobs.state import JobStatus
from core.schema_rules import PY_WHITESPACE

TEXT = r"^[^\x00-\x1f\x7f]+$"
MAX_SEQ = 2**31 - 1  # event sequence numbers are 32-bit integers

JobId = Annotated[str, Path(max_length=64, pattern=TEXT)]
SetId = Annotated[str, Path(max_length=64, pattern=TEXT)]
ArtifactName = Annotated[str, Path(max_length=512, pattern=TEXT)]
EndpointId = Annotated[str, Path(max_length=64, pattern=TEXT)]
IdCursor = Annotated[
    str | None, Query(max_length=64, pattern=TEXT, description="cursor: id of the last item of the previous page")
]
SeqCursor = Annotated[int, Query(ge=0, le=MAX_SEQ, description="return events with id > after")]

# statuses separated by commas; spaces around each are ignored and empty ones skipped (as the listing reads it)
_STATUS_ITEM = f"[{PY_WHITESPACE}]*(?:{'|'.join(JobStatus)})?[{PY_WHITESPACE}]*"
StatusFilter = Annotated[
    str | None,
    Query(
        description=f"comma-separated statuses, any of: {', '.join(JobStatus)}",
        examples=["running,queued"],
        json_schema_extra={"pattern": f"^{_STATUS_ITEM}(?:,{_STATUS_ITEM})*$"},
    ),
]


def status_list(status: str | None) -> list[str] | None:
    """The statuses of a StatusFilter, None for no filter."""
    return [s.strip() for s in status.split(",") if s.strip()] if status else None
