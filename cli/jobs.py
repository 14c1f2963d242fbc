"""`secateurs jobs ...`: pruning jobs on a secateurs server, through the Python client (client/).

`submit` takes the flags of `secateurs prune` (generated from PruneConfig, cli/flags.py) less those the server
decides (--device, --trust-remote-code), or a job document (--file); a local file given as --calibration or
--eval is uploaded as a calibration set first, once: a set with the same sha256 is reused."""

from __future__ import annotations

import functools
import inspect
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import typer.main
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from cli.lazy import LazyGroup
from cli.remote import (
    EXIT_OK,
    ApiKeyOpt,
    Done,
    JsonOpt,
    ProfileOpt,
    ServerOpt,
    UsageError,
    command,
    connect,
    duration,
    err,
    exit_for,
    job_outcome,
    print_json,
    print_table,
    short,
)
from cli.sweep_view import request_targets, sweep_table
from client import Client, CreatedJob, Event, Job
from client.models import STATUSES

if TYPE_CHECKING:
    from cli.flags import Flag


class _Commands(LazyGroup):
    # submit's flags are PruneConfig's and the registered methods' options: building them imports the methods
    # (and torch), so only `jobs submit` does, when it runs
    lazy = {  # noqa: RUF012
        "submit": (
            "cli.jobs:submit_command()",
            "Submit a pruning job (the flags of `secateurs prune`, or --file job.json).",
        )
    }


app = typer.Typer(
    no_args_is_help=True, cls=_Commands, help="Pruning jobs on a secateurs server (submit, follow, download)."
)

SERVER_DECIDES = {("device",), ("trust_remote_code",)}  # the worker decides where and how code runs
CAL_ID = re.compile(r"^cal_[0-9a-f]{26}$")
OWN_FLAGS: dict[tuple[str, ...], str] = {("model",): "--model", ("metadata",): "--metadata"}


@functools.cache
def submit_flags() -> list[Flag]:
    from cli import flags

    return [f for f in flags.config_flags() if f.path not in SERVER_DECIDES]


def flag_name(loc: tuple[str | int, ...]) -> str:
    path = tuple(str(x) for x in loc)
    if path[:1] == ("calibration",) and path[1:] in (("calibration_set_id",), ("texts",)):
        return "--calibration"
    if path[:1] == ("evaluation",) and path[1:] == ("calibration_set_id",):
        return "--eval"
    from cli import flags

    return OWN_FLAGS.get(path[:1]) or flags.flag_for(loc, submit_flags())


# submit ------------------------------------------------------------------------------------------------------
def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _text_source(c: Client, body: dict[str, Any], block: str, flag: str, json_out: bool) -> None:
    """A block's `source` that is neither a named set nor already an id: a local file, uploaded (once)."""
    spec = body.get(block)
    if not isinstance(spec, dict) or not isinstance(spec.get("source"), str):
        return
    source = spec["source"]
    from core.pruning.config import NAMED_SETS

    if source in NAMED_SETS:
        return
    if CAL_ID.match(source):
        spec["calibration_set_id"] = spec.pop("source")
        return
    path = Path(source).expanduser()
    if not path.is_file():
        raise UsageError(f"{flag}: {source!r} is neither a named set ({', '.join(NAMED_SETS)}) nor a file")
    cs, uploaded = c.ensure_calibration_set(path)
    if not json_out:
        what = "uploaded" if uploaded else "reusing calibration set"
        err.print(f"{what} {cs.id} ({path.name}, {cs.records} records, sha256 {cs.sha256[:12]}…)")
    del spec["source"]
    spec["calibration_set_id"] = cs.id


def _created_line(job: CreatedJob) -> str:
    line = f"created [bold]{job.id}[/] ({job.status})"
    if job.replayed:
        return line + ": the job this --idempotency-key created before"
    if job.enqueue == "deferred":
        return line + (
            "; [yellow]deferred[/]: the server could not reach its queue just now, and the job goes to the workers "
            "as soon as it can"
        )
    return line


def _metadata(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--metadata: expected KEY=VALUE, got {item!r}")
        out[key] = value
    return out


@command(name_of=flag_name)
def submit(
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Hugging Face hub id, a directory the server may read, or s3://")
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option("--file", "-f", help="a job document (JSON, as POST /v1/pruning-jobs takes); flags override it"),
    ] = None,
    metadata: Annotated[
        list[str] | None, typer.Option("--metadata", help="KEY=VALUE, echoed back (repeatable)")
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option("--idempotency-key", help="repeat a submission without a second job")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="follow the job until it ends (exit status: its outcome)")
    ] = False,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="after it succeeded, download the job's files here (waits)")
    ] = None,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    profile: ProfileOpt = None,
    json_out: JsonOpt = False,
    **given: Any,
) -> None:
    """Submit a pruning job (the flags of `secateurs prune`, or --file job.json)."""
    body: dict[str, Any] = {}
    if file is not None:
        try:
            body = json.loads(file.read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise UsageError(f"--file: {e}") from None
        if not isinstance(body, dict):
            raise UsageError("--file: expected a JSON object")
    from cli import flags

    try:
        body = _merge(body, flags.config_input(submit_flags(), given))
    except flags.FlagError as e:
        raise UsageError(str(e)) from None
    if model:
        body["model"] = model
    if not body.get("model"):
        raise UsageError("--model is required (or a --file that names the model)")
    if metadata:
        body["metadata"] = {**(body.get("metadata") or {}), **_metadata(metadata)}
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out: {out} exists and is not an empty directory")
    with connect(server, api_key, profile) as c:
        _text_source(c, body, "calibration", "--calibration", json_out)
        _text_source(c, body, "evaluation", "--eval", json_out)
        created = c.create_job(body, idempotency_key=idempotency_key)
        if not (wait or out):
            if json_out:
                print_json(created)
            else:
                err.print(_created_line(created))
                typer.echo(created.id)
            return
        if not json_out:
            err.print(_created_line(created))
        job = _follow(c, created, json_out)
        if job.status == "succeeded" and out is not None:
            _download(c, job.id, out, overwrite=False, quiet=json_out)
        if json_out:  # the job as it ended, and what its creation's answer said
            print_json({**job.model_dump(mode="json"), "enqueue": created.enqueue, "replayed": created.replayed})
        else:
            job_outcome(job)
        raise Done(exit_for(job))


_OWN_PARAMS = list(inspect.signature(submit, eval_str=True).parameters.values())[:-1]  # less **given


@functools.cache
def submit_command() -> Any:
    """`jobs submit` with one flag per PruneConfig field and method option (built on first use: see _Commands)."""
    from cli import flags

    signature = inspect.Signature(_OWN_PARAMS + [flags.typer_parameter(f) for f in submit_flags()])
    submit.__signature__ = signature  # type: ignore[attr-defined]
    submit.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    holder = typer.Typer()
    holder.command("submit")(submit)
    return typer.main.get_command(holder)


# follow ------------------------------------------------------------------------------------------------------
class _Watch:
    """A rich progress line fed by the job's events: status and stage, the run's fraction, block i/N, ETA."""

    def __init__(self, job: Job, quiet: bool) -> None:
        self.quiet = quiet
        self.status = job.status
        self.stage = ""
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[blocks]}"),
            TextColumn("ETA {task.fields[eta]}"),
            console=err,
            disable=quiet,
            transient=False,
        )
        self.task: TaskID = self.bar.add_task(job.id, total=1.0, blocks="", eta="-")
        if job.progress is not None:
            self._progress(job.progress.model_dump())
        self._describe()

    def __enter__(self) -> _Watch:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def _describe(self) -> None:
        self.bar.update(self.task, description=f"{self.status}" + (f" · {self.stage}" if self.stage else ""))

    def _progress(self, p: dict[str, Any]) -> None:
        if p.get("stage") and p["stage"] != self.stage:
            self.stage = p["stage"]
            if not self.quiet and not err.is_terminal:
                err.print(f"stage: {self.stage}")
        blocks = (
            f"block {p['block'] + 1}/{p['total_blocks']}"
            if p.get("block") is not None and p.get("total_blocks")
            else ""
        )
        if p.get("stage") == "recover" and p.get("message"):  # step i/N and the running loss
            blocks = str(p["message"])
        fields: dict[str, Any] = {"blocks": blocks, "eta": duration(p.get("eta_seconds"))}
        if p.get("fraction") is not None:
            fields["completed"] = float(p["fraction"])
        self.bar.update(self.task, **fields)

    def on_event(self, e: Event) -> None:
        if e.type == "status":
            self.status = str(e.data.get("status", self.status))
            if not self.quiet and not err.is_terminal:
                err.print(f"status: {self.status}")
            if self.status == "succeeded":
                self.bar.update(self.task, completed=1.0, eta="0s")
        elif e.type == "progress":
            self._progress(e.data)
        self._describe()


def _follow(c: Client, job: Job, quiet: bool, stream: bool = True) -> Job:
    if job.terminal:
        return job
    try:
        with _Watch(job, quiet) as w:
            return c.wait(job.id, on_event=w.on_event, stream=stream)
    except KeyboardInterrupt:
        err.print(f"{job.id} goes on on the server; `secateurs jobs cancel {job.id}` stops it")
        raise


@app.command("watch")
@command()
def watch(
    job_id: Annotated[str, typer.Argument(help="the job's id")],
    poll: Annotated[bool, typer.Option("--poll", help="poll (GET with ETag) instead of the event stream")] = False,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    profile: ProfileOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Follow a job to its end with a progress bar (stage, block i/N, ETA); exit status: its outcome."""
    with connect(server, api_key, profile) as c:
        job = _follow(c, c.get_job(job_id), json_out, stream=not poll)
    if json_out:
        print_json(job)
    else:
        job_outcome(job)
    raise Done(exit_for(job))


# read --------------------------------------------------------------------------------------------------------
def _target(j: Job) -> str:
    sweep = request_targets(j.request or {})
    if sweep:
        return sweep
    if j.pattern:
        return j.pattern
    if j.sparsity is not None:
        return f"{j.sparsity:g}"
    structure = j.request.get("structure")
    return "structured" if structure else "-"


def _fraction(j: Job) -> str:
    if j.status == "succeeded":
        return "100%"
    if j.progress is not None and j.progress.fraction is not None:
        return f"{j.progress.fraction:.0%}"
    return "-"


@app.command("list")
@command()
def list_jobs(
    status: Annotated[str | None, typer.Option("--status", help=f"comma-separated: {', '.join(STATUSES)}")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="at most this many (newest first)")] = 20,
    all_: Annotated[bool, typer.Option("--all", help="every job, page by page")] = False,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    profile: ProfileOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """List jobs, newest first."""
    with connect(server, api_key, profile) as c:
        jobs: list[Job] = []
        for j in c.iter_jobs(status=status, page_size=min(limit, 100) if not all_ else 100):
            jobs.append(j)
            if not all_ and len(jobs) >= limit:
                break
    if json_out:
        print_json(jobs)
        return
    t = Table("id", "status", "method", "target", "model", "created", "done")
    for j in jobs:
        t.add_row(
            j.id,
            j.status,
            j.method,
            _target(j),
            short(j.model, 32),
            j.timestamps.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            _fraction(j),
        )
    if jobs:
        print_table(t)
    else:
        err.print("no jobs")


@app.command("show")
@command()
def show(
    job_id: Annotated[str, typer.Argument(help="the job's id")],
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    profile: ProfileOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show a job: status, progress, error, metrics."""
    with connect(server, api_key, profile) as c:
        j = c.get_job(job_id)
    if json_out:
        print_json(j)
        return
    t = Table(show_header=False, title=j.id)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("status", j.status + (f" (attempt {j.attempt}/{j.max_attempts})" if j.attempt > 1 else ""))
    t.add_row("model", j.model)
    t.add_row("method", f"{j.method}, {_target(j)}")
    if j.progress is not None and not j.terminal:
        p = j.progress
        blocks = f", block {p.block + 1}/{p.total_blocks}" if p.block is not None and p.total_blocks else ""
        frac = f", {p.fraction:.0%}" if p.fraction is not None else ""
        t.add_row("progress", f"{p.stage or '-'}{blocks}{frac}, ETA {duration(p.eta_seconds)}")
    if j.error is not None:
        t.add_row("error", f"{j.error.code}: {j.error.message}")
    m = j.metrics or {}
    if m.get("achieved_sparsity") is not None:
        t.add_row("achieved sparsity", f"{m['achieved_sparsity']:.4f}")
    ppl = m.get("perplexity") or {}
    if ppl.get("dense") is not None:
        after = f" → {ppl['recovered']:.4f} recovered" if ppl.get("recovered") is not None else ""
        t.add_row("perplexity", f"{ppl['dense']:.4f} → {ppl.get('pruned') or float('nan'):.4f}{after}")
    ts = j.timestamps
    t.add_row("created", ts.created_at.isoformat(timespec="seconds"))
    if ts.finished_at is not None:
        t.add_row("finished", ts.finished_at.isoformat(timespec="seconds"))
    for k, v in j.metadata.items():
        t.add_row(f"metadata.{k}", v)
    print_table(t)
    if m.get("sweep"):
        print_table(sweep_table(m["sweep"]))


# change ------------------------------------------------------------------------------------------------------
@app.command("cancel")
@command()
def cancel(
    job_id: Annotated[str, typer.Argument(help="the job's id")],
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    profile: ProfileOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Cancel a job: a queued one at once, a running one between two blocks (`watch` to see it end)."""
    with connect(server, api_key, profile) as c:
        j = c.cancel_job(job_id)
    if json_out:
        print_json(j)
    else:
        err.print(f"{j.id}: {j.status}")
    raise Done(EXIT_OK)


# download ----------------------------------------------------------------------------------------------------
def _download(c: Client, job_id: str, dest: Path, *, overwrite: bool, quiet: bool) -> dict[str, Any]:
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
        disable=quiet,
    )
    tasks: dict[str, TaskID] = {}

    def on_progress(name: str, done: int, total: int) -> None:
        if name not in tasks:
            tasks[name] = bar.add_task(short(name, 40), total=total)
        bar.update(tasks[name], completed=done)

    with bar:
        result = c.download(job_id, dest, overwrite=overwrite, on_progress=on_progress)
    out = result.as_dict()
    if not quiet:
        resumed = sum(1 for f in result.files if f.resumed_from)
        err.print(
            f"{len(result.files)} files in {result.path}, every sha256 verified"
            + (f" ({resumed} resumed)" if resumed else "")
        )
    return out


@app.command("download")
@command()
def download(
    job_id: Annotated[str, typer.Argument(help="the job's id")],
    dest: Annotated[Path, typer.Argument(help="directory to create (transformers loads it)")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace DEST if it exists")] = False,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    profile: ProfileOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Download every artifact of a job, verified against their sha256 (resumes an interrupted download)."""
    with connect(server, api_key, profile) as c:
        out = _download(c, job_id, dest, overwrite=overwrite, quiet=json_out)
    if json_out:
        print_json(out)
