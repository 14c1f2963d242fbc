"""The `secateurs` command line. Each command is imported when it runs (cli/lazy.py): the remote commands
(`jobs`, `calibration`) start without importing torch, which `prune`, `unpack` and the service need."""

from __future__ import annotations

import typer

from cli.lazy import LazyGroup


class _Commands(LazyGroup):
    lazy = {  # noqa: RUF012  (a class-level table, never mutated)
        "prune": ("cli.prune:prune", "Prune a model block by block and write a directory transformers loads."),
        "unpack": (
            "cli.unpack:unpack",
            "Rebuild the dense safetensors checkpoint that transformers loads (bit-exact).",
        ),
        "service": (
            "cli.service:app",
            "Run and administer the pruning-jobs service (API, prune and webhook workers).",
        ),
        "jobs": ("cli.jobs:app", "Pruning jobs on a secateurs server (submit, follow, download)."),
        "calibration": ("cli.calibration:app", "Calibration sets on a secateurs server (upload, list, show)."),
    }


app = typer.Typer(no_args_is_help=True, cls=_Commands)


@app.callback()
def _root() -> None:
    """secateurs: prune large language models."""


def main() -> None:
    app()
