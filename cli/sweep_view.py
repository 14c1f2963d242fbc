"""How a sweep shows in the terminal: its targets in one short cell (`0.3..0.7 (5) + 2:4`) for job lists, and a
table of its per-target results (perplexity, achieved sparsity, exported, time)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table


def targets_text(sparsities: Sequence[float] | None, patterns: Sequence[str] | None) -> str | None:
    """`0.3..0.7 (5) + 2:4, 4:8`; None when there is no sweep."""
    if not sparsities and not patterns:
        return None
    parts = []
    if sparsities:
        r = sorted(float(x) for x in sparsities)
        parts.append(f"{r[0]:g}" if len(r) == 1 else f"{r[0]:g}..{r[-1]:g} ({len(r)})")
    if patterns:
        parts.append(", ".join(patterns))
    return " + ".join(parts)


def request_targets(request: Mapping[str, Any]) -> str | None:
    """The sweep cell of a job from its request (the body it was created with)."""
    return targets_text(request.get("sparsities"), request.get("patterns"))


def _num(x: Any, fmt: str = ".4f") -> str:
    return "n/a" if not isinstance(x, int | float) else format(x, fmt)


def sweep_table(sweep: Mapping[str, Any], title: str = "sweep") -> Table:
    """One row per target: what it asked for, what it got, and whether its model was written."""
    t = Table(title=title)
    for col, right in (("target", False), ("achieved", True), ("perplexity", True), ("exported", False)):
        t.add_column(col, justify="right" if right else "left")
    t.add_column("time", justify="right")
    dense = sweep.get("dense_perplexity")
    if dense is not None:
        t.add_row("dense", "0", _num(dense), "", "")
    for p in sweep.get("points") or []:
        t.add_row(
            str(p.get("target")),
            _num(p.get("achieved_sparsity")),
            _num(p.get("perplexity")),
            f"yes ({p.get('dir')})" if p.get("exported") else "no",
            f"{p['wall_s']:.1f}s" if isinstance(p.get("wall_s"), int | float) else "",
        )
    return t
