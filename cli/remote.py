"""What the remote commands (`secateurs jobs ...`, `secateurs calibration ...`) share: where the server is and
which key to use, the client, JSON output, and exit statuses: 0 succeeded, 1 failed (the error's code and
message are printed), 2 bad usage, 130 cancelled (the job was cancelled, or the command interrupted).

The server and key come from, first to last: ``--server``/``--api-key``; the profile named by ``--profile`` (or
``SECATEURS_PROFILE``); ``SECATEURS_SERVER``/``SECATEURS_API_KEY``; the ``[default]`` profile. Profiles live in
``$SECATEURS_PROFILES`` or ``${XDG_CONFIG_HOME:-~/.config}/secateurs/profiles.toml``::

    [default]
    server = "http://localhost:8000"
    api_key = "sct_..."

    [staging]
    server = "https://secateurs.staging.example.com"
    api_key = "sct_..."
    retries = 8          # failed calls retried (default 5; or SECATEURS_RETRIES)
"""

from __future__ import annotations

import functools
import json
import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape

from client import ApiError, BadRequest, Client, Job, RetryPolicy, SecateursError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130
err = Console(stderr=True, highlight=False, soft_wrap=True)


def print_table(table: Any) -> None:
    """A table on stdout: as wide as the terminal, or as wide as it needs when piped (ids are never cut)."""
    import sys

    Console(highlight=False, width=None if sys.stdout.isatty() else 240).print(table)


PANEL = "Connection"
ServerOpt = Annotated[
    str | None,
    typer.Option("--server", help="API base URL (or SECATEURS_SERVER, or a profile)", rich_help_panel=PANEL),
]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", help="API key (or SECATEURS_API_KEY, or a profile)", rich_help_panel=PANEL),
]
ProfileOpt = Annotated[
    str | None,
    typer.Option("--profile", help="a profile of profiles.toml (or SECATEURS_PROFILE)", rich_help_panel=PANEL),
]
JsonOpt = Annotated[bool, typer.Option("--json", help='print JSON to stdout (errors too, as {"error": ...})')]


class UsageError(Exception):
    """Bad usage found by the command itself (exit status 2)."""


class Done(Exception):
    """Leave with this exit status (after the output is written)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def profiles_path() -> Path:
    if os.environ.get("SECATEURS_PROFILES"):
        return Path(os.environ["SECATEURS_PROFILES"]).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "secateurs" / "profiles.toml"


def _profiles() -> tuple[Path, dict[str, Any]]:
    path = profiles_path()
    if not path.is_file():
        return path, {}
    try:
        return path, tomllib.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"{path}: {e}") from None


def resolve(server: str | None, api_key: str | None, profile: str | None) -> tuple[str, str | None]:
    """The server URL and API key, from the flags, a profile, the environment (see the module's doc)."""
    path, profiles = _profiles()
    profile = profile or os.environ.get("SECATEURS_PROFILE") or None
    named: dict[str, Any] = {}
    if profile:
        if not isinstance(profiles.get(profile), dict):
            raise UsageError(f"--profile: no profile [{profile}] in {path}")
        named = profiles[profile]
    default: dict[str, Any] = profiles["default"] if isinstance(profiles.get("default"), dict) else {}
    server = server or named.get("server") or os.environ.get("SECATEURS_SERVER") or default.get("server")
    api_key = api_key or named.get("api_key") or os.environ.get("SECATEURS_API_KEY") or default.get("api_key")
    if not server:
        raise UsageError(f"no server: give --server, set SECATEURS_SERVER, or add a [default] profile to {path}")
    if not str(server).startswith(("http://", "https://")):
        raise UsageError(f"--server: expected an http(s) URL, got {server!r}")
    return str(server), (str(api_key) if api_key else None)


def retries(profile: str | None) -> int | None:
    """How often a failed call is retried: SECATEURS_RETRIES, or ``retries`` in the profile (default: the client's)."""
    raw: Any = os.environ.get("SECATEURS_RETRIES")
    if not raw:
        _, profiles = _profiles()
        section = profiles.get(profile or os.environ.get("SECATEURS_PROFILE") or "default")
        raw = section.get("retries") if isinstance(section, dict) else None
    if raw is None or raw == "":
        return None
    try:
        n = int(raw)
    except (TypeError, ValueError):
        n = -1
    if n < 0:
        raise UsageError(f"retries: expected a whole number >= 0, got {raw!r}")
    return n


def connect(server: str | None, api_key: str | None, profile: str | None) -> Client:
    url, key = resolve(server, api_key, profile)
    n = retries(profile)
    return Client(url, key, retry=RetryPolicy(max_retries=n) if n is not None else None)


def to_jsonable(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, list | tuple):
        return [to_jsonable(o) for o in obj]
    return obj


def print_json(obj: Any) -> None:
    typer.echo(json.dumps(to_jsonable(obj), indent=2, default=str))


def exit_for(job: Job) -> int:
    return {"succeeded": EXIT_OK, "cancelled": EXIT_CANCELLED}.get(job.status, EXIT_FAILED)


def job_outcome(job: Job) -> None:
    """One line on stderr for a finished job (its error's code and message when it failed)."""
    if job.status == "succeeded":
        err.print(f"[green]{job.id} succeeded[/]")
    elif job.status == "cancelled":
        err.print(f"[yellow]{job.id} cancelled[/]")
    elif job.error is not None:
        err.print(f"[bold red]error:[/] {job.id} failed: {escape(job.error.code)}: {escape(job.error.message)}")
    else:
        err.print(f"[bold red]error:[/] {job.id} {job.status}")


def _describe(e: ApiError, name_of: Callable[[tuple[str | int, ...]], str] | None) -> str:
    if e.errors and name_of is not None:
        parts = []
        for item in e.errors:
            loc = tuple(x for x in item.get("loc", []) if x not in ("body", "query", "path", "header"))
            parts.append(f"{name_of(loc)}: {item.get('msg', '')}")
        return "; ".join(parts)
    return e.detail or e.title


F = TypeVar("F", bound=Callable[..., Any])


def command(name_of: Callable[[tuple[str | int, ...]], str] | None = None) -> Callable[[F], F]:
    """Wrap a remote command: its failures become the documented exit statuses and one line on stderr (and
    ``{"error": problem}`` on stdout under ``--json``). ``name_of`` maps a problem's field to a flag name."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            json_out = bool(kwargs.get("json_out"))
            try:
                return fn(*args, **kwargs)
            except Done as d:
                raise typer.Exit(d.code) from None
            except KeyboardInterrupt:
                err.print("[yellow]interrupted[/]")
                raise typer.Exit(EXIT_CANCELLED) from None
            except UsageError as e:
                _fail(str(e), None, EXIT_USAGE, json_out)
            except BadRequest as e:
                _fail(f"{e.code or e.status}: {_describe(e, name_of)}", e.to_dict(), EXIT_USAGE, json_out)
            except ApiError as e:
                _fail(f"{e.code or e.status}: {_describe(e, None)}", e.to_dict(), EXIT_FAILED, json_out)
            except SecateursError as e:
                kind = type(e).__name__
                _fail(f"{kind}: {e}", {"title": kind, "detail": str(e)}, EXIT_FAILED, json_out)

        return wrapper  # type: ignore[return-value]

    return wrap


def _fail(message: str, problem: dict[str, Any] | None, code: int, json_out: bool) -> NoReturn:
    if json_out:
        print_json({"error": problem or {"title": "Bad usage", "detail": message}})
    err.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"
