"""`secateurs unpack DIR OUT`: rebuild a dense checkpoint from a compact sparse one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from core.pruning.errors import PruningError


def unpack(
    compact_dir: Annotated[Path, typer.Argument(help="compact checkpoint directory (has compact.json)")],
    out: Annotated[Path, typer.Argument(help="where to write the dense model directory")],
) -> None:
    """Rebuild the dense safetensors checkpoint that transformers loads (bit-exact)."""
    from core.pruning.compact import read_meta
    from core.pruning.compact import unpack as do_unpack

    try:
        meta = read_meta(compact_dir)
        do_unpack(compact_dir, out)
    except PruningError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    n = len(meta["tensors"])
    sparse = sum(e["encoding"] != "dense" for e in meta["tensors"].values())
    typer.echo(f"unpacked {n} tensors ({sparse} stored sparse) into {out}")
