"""Documents of a calibration or evaluation text file (no heavy imports: the API validates uploads with it)."""

from __future__ import annotations

import json


def parse_documents(raw: str, jsonl: bool) -> list[str]:
    """A .jsonl file gives one document per line (a string, or an object with a "text" string); any other
    file is one document. Raises ValueError saying what is wrong and where."""
    if not jsonl:
        if not raw.strip():
            raise ValueError("is empty")
        return [raw]
    texts = []
    for ln, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"line {ln}: not JSON ({e.msg})") from None
        text = obj if isinstance(obj, str) else obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise ValueError(f'line {ln}: expected a string or an object with a "text" string')
        texts.append(text)
    if not any(t.strip() for t in texts):
        raise ValueError("has no non-empty text")
    return texts
