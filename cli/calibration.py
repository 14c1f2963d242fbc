"""`secateurs calibration ...`: calibration sets on a secateurs server (.txt or .jsonl texts that jobs calibrate
or evaluate on, by id)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.remote import (
    ApiKeyOpt,
    JsonOpt,
    ProfileOpt,
    ServerOpt,
    UsageError,
    command,
    connect,
    err,
    print_json,
    print_table,
)
from client import CalibrationSet

app = typer.Typer(no_args_is_help=True, help="Calibration sets on a secateurs server (upload, list, show).")


def _table(sets: list[CalibrationSet]) -> Table:
    t = Table("id", "filename", "format", "records", "size", "sha256", "created")
    for cs in sets:
        t.add_row(
            cs.id,
            cs.filename,
            cs.format,
            str(cs.records),
            f"{cs.size:,}",
            cs.sha256[:12] + "…",
            cs.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    return t


@app.command("upload")
@command()
def upload(
    file: Annotated[Path, typer.Argument(help='.txt (paragraphs) or .jsonl (one {"text": ...} per line)')],
    force: Annotated[bool, typer.Option("--force", help="upload even if a set with the same sha256 exists")] = False,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    profile: ProfileOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Upload a calibration set; the same file (by sha256) is uploaded once and reused after."""
    if not file.is_file():
        raise UsageError(f"FILE: {file} is not a file")
    with connect(server, api_key, profile) as c:
        if force:
            cs, uploaded = c.upload_calibration_set(file), True
        else:
            cs, uploaded = c.ensure_calibration_set(file)
    if json_out:
        print_json(cs)
        return
    err.print(("uploaded " if uploaded else "already there: ") + f"{cs.id} ({cs.records} records)")
    typer.echo(cs.id)


@app.command("list")
@command()
def list_sets(
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    profile: ProfileOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """List the tenant's calibration sets, newest first."""
    with connect(server, api_key, profile) as c:
        sets = list(c.iter_calibration_sets())
    if json_out:
        print_json(sets)
    elif sets:
        print_table(_table(sets))
    else:
        err.print("no calibration sets")


@app.command("show")
@command()
def show(
    set_id: Annotated[str, typer.Argument(help="the set's id (cal_...)")],
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    profile: ProfileOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show one calibration set."""
    with connect(server, api_key, profile) as c:
        cs = c.get_calibration_set(set_id)
    if json_out:
        print_json(cs)
    else:
        print_table(_table([cs]))
