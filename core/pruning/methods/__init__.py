"""Pruning methods: each module defines one `Method` subclass, registered by its `name`."""

from __future__ import annotations

import importlib
import pkgutil

from core.pruning.methods.base import REGISTRY, Method, Pruned, Stats, Target

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")


def get(name: str) -> type[Method]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(REGISTRY)}") from None


__all__ = ["REGISTRY", "Method", "Pruned", "Stats", "Target", "get"]
