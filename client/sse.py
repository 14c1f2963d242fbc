"""A Server-Sent Events parser (the WHATWG event-stream format) over an iterator of decoded lines."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Message:
    """One dispatched event; ``comment`` is set (and the rest empty) for a comment line such as a keep-alive."""

    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None
    comment: str | None = None


def parse(lines: Iterable[str]) -> Iterator[Message]:
    """Events as they complete (a blank line ends one); comments are handed on as they come, so a reader
    blocked on a quiet stream still wakes at each keep-alive."""
    data: list[str] = []
    event = ""
    last_id: str | None = None
    retry: int | None = None
    for line in lines:
        if line == "":
            if data:
                yield Message(event or "message", "\n".join(data), last_id, retry)
            data, event = [], ""
            continue
        if line.startswith(":"):
            yield Message(comment=line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
        elif name == "id":
            if "\0" not in value:
                last_id = value
        elif name == "retry" and value.isdigit():
            retry = int(value)
