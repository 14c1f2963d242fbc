"""JSON Schema spellings of the rules validators enforce across fields, for published schemas (OpenAPI 3.1 is
JSON Schema 2020-12). Patterns are written for ECMA-262 and Python alike: explicit character classes, no
`\\s`, `\\d` or `\\w`, whose meaning differs between the two."""

from __future__ import annotations

from typing import Any

JsonSchema = dict[str, Any]

# What str.strip() removes (every character whose str.isspace() is true): a text is blank when only these remain.
PY_WHITESPACE = r"\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
NON_BLANK = f"[^{PY_WHITESPACE}]"  # unanchored: the string holds at least one such character
CONTROL = r"\x00-\x1f\x7f"


def given(name: str, schema: JsonSchema | None = None) -> JsonSchema:
    """`name` is present and not null (and meets `schema`)."""
    return {"required": [name], "properties": {name: {"not": {"type": "null"}, **(schema or {})}}}


def at_most_one_of(*names: str) -> JsonSchema:
    """No two of `names` are given (present and not null)."""
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    return {"not": {"anyOf": [{"allOf": [given(a), given(b)]} for a, b in pairs]}}
