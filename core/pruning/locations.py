"""Whether a model reference names a local path or a hub id: one answer for the CLI, the engine and the job
service (which must not touch the filesystem to decide it)."""

from __future__ import annotations

from pathlib import Path


def names_local_path(ref: str) -> bool:
    """True when ``ref`` is written as a filesystem path, not as a hub id ``name`` or ``org/name``.

    Syntax only: no file is looked at, so a service can call it on a tenant's input."""
    return ref.startswith(("/", ".", "~", "file:")) or "\\" in ref or ref.count("/") > 1


def is_local_model(ref: str) -> bool:
    """On the machine that loads the model: a path by its syntax, or a relative directory that exists here
    (transformers, too, prefers an existing local directory to a hub id of the same name)."""
    return names_local_path(ref) or Path(ref).expanduser().exists()
