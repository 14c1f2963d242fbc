"""What a job's `model` may name: a hub id (org/name), an s3:// prefix, or a directory inside one of the
server's allowed model roots."""

from __future__ import annotations

import re
from pathlib import Path

from core.errors import InvalidInput
from core.pruning.locations import names_local_path
from core.schema_rules import JsonSchema

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
S3_URI = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$")

# The hub ids and s3:// prefixes `classify_model` takes. A local directory is not stated: whether one is taken
# depends on the server's allowed roots and on what exists under them, which no schema can say.
MODEL_REF_SCHEMA: JsonSchema = {
    "anyOf": [
        {"allOf": [{"pattern": HUB_ID.pattern}, {"not": {"pattern": r"\.\."}}]},
        {"pattern": S3_URI.pattern},
    ]
}


def classify_model(model: str, roots: list[Path]) -> str:
    """'hub', 'local' or 's3'; raises InvalidInput naming ``model``."""
    if model.startswith("s3://"):
        if not S3_URI.match(model):
            raise InvalidInput.field(["model"], "not a valid s3://bucket/prefix URI")
        return "s3"
    if not names_local_path(model):
        if ".." in model or not HUB_ID.match(model):
            raise InvalidInput.field(["model"], "not a hub id (org/name), an allowed local path or an s3:// URI")
        return "hub"
    # never expanduser(): "~user/..." would consult the OS user database and tell a tenant which users exist
    p = Path(model.removeprefix("file://"))
    if not p.is_absolute():
        raise InvalidInput.field(["model"], "local model paths must be absolute")
    resolved = p.resolve()
    if not any(resolved == r or resolved.is_relative_to(r) for r in roots):
        raise InvalidInput.field(["model"], "path is outside the allowed model roots")
    if not resolved.is_dir():
        raise InvalidInput.field(["model"], "no model directory at this path")
    return "local"


def check_task_path(path: str, roots: list[Path], index: int) -> str:
    """A directory of lm-eval task files (`evaluation.task_paths[index]`) inside one of the server's allowed task
    roots, like a local model: its resolved path; raises InvalidInput naming it."""
    loc: list[str | int] = ["evaluation", "task_paths", index]
    if not roots:
        raise InvalidInput.field(loc, "this server allows no local task paths (SECATEURS_ALLOWED_TASK_ROOTS)")
    p = Path(path.removeprefix("file://"))
    if not p.is_absolute():
        raise InvalidInput.field(loc, "task paths must be absolute")
    resolved = p.resolve()
    if not any(resolved == r or resolved.is_relative_to(r) for r in roots):
        raise InvalidInput.field(loc, "path is outside the allowed task roots")
    if not resolved.is_dir():
        raise InvalidInput.field(loc, "no directory at this path")
    return str(resolved)
