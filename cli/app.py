"""The `secateurs` command line."""

from __future__ import annotations

import typer

from cli.prune import prune
from cli.unpack import unpack

app = typer.Typer(no_args_is_help=True)


@app.callback()
def _root() -> None:
    """secateurs: prune large language models."""


app.command("prune")(prune)
app.command("unpack")(unpack)

from cli.service import app as service_app  # noqa: E402

app.add_typer(service_app, name="service")


def main() -> None:
    app()
