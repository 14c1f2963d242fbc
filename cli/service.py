"""`secateurs service ...`: run and administer the pruning-jobs service."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

app = typer.Typer(
    no_args_is_help=True, help="Run and administer the pruning-jobs service (API, prune and webhook workers)."
)


def _settings():  # noqa: ANN202
    from core.settings import get_settings

    s = get_settings()
    s.ensure_dirs()
    return s


@app.command("migrate")
def migrate(revision: str = "head") -> None:
    """Create or upgrade the database schema (Alembic)."""
    from core.db.migrate import upgrade

    s = _settings()
    upgrade(s.db_url, revision)
    typer.echo(f"database at {revision}: {s.db_url.split('@')[-1]}")


@app.command("create-tenant")
def create_tenant(name: str) -> None:
    """Create a tenant; prints its id."""
    from core.auth import create_tenant as _create
    from core.db.engine import session_scope

    s = _settings()
    with session_scope(s.db_url) as sess:
        t = _create(sess, name)
        tid = t.id
    typer.echo(tid)


@app.command("create-key")
def create_key(
    tenant: Annotated[str, typer.Argument(help="tenant id or name")],
    name: Annotated[str, typer.Option(help="label for the key")] = "",
    create_tenant: Annotated[bool, typer.Option("--create-tenant", help="create the tenant if missing")] = False,
) -> None:
    """Create an API key bound to a tenant; prints the key (shown only once)."""
    from core.auth import create_key as _key
    from core.auth import create_tenant as _tenant
    from core.db.engine import session_scope
    from core.db.repositories import TenantRepository
    from core.errors import ServiceError

    s = _settings()
    try:
        with session_scope(s.db_url) as sess:
            repo = TenantRepository(sess)
            if create_tenant and repo.get(tenant) is None and repo.by_name(tenant) is None:
                _tenant(sess, tenant)
            _, full = _key(sess, tenant, s.pepper, name)
    except ServiceError as e:
        typer.echo(f"error: {e.detail}", err=True)
        raise typer.Exit(1) from None
    typer.echo(full)


@app.command("api")
def serve_api(
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: Annotated[
        int,
        typer.Option(
            min=1, envvar="SECATEURS_API_WORKERS", help="API processes; on Postgres each hears every job event"
        ),
    ] = 1,
    migrate_first: Annotated[bool, typer.Option("--migrate/--no-migrate", help="run migrations first")] = True,
) -> None:
    """Serve the HTTP API with uvicorn."""
    import uvicorn

    if migrate_first:
        migrate()
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        access_log=False,
        proxy_headers=True,
        # event streams end by themselves on SIGTERM (api.streams); this bounds any other slow response
        timeout_graceful_shutdown=30,
    )


@app.command("worker", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run_worker(
    ctx: typer.Context,
    loglevel: str = "INFO",
    hostname: Annotated[str | None, typer.Option(help="Celery node name")] = None,
) -> None:
    """Run a Celery worker (one job per process, fresh child per job). Extra args go to Celery."""
    from worker.main import app as celery_app

    argv = [
        "worker",
        f"--loglevel={loglevel}",
        "--pool=prefork",
        "--concurrency=1",
        "-Q",
        celery_app.conf.task_default_queue,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    celery_app.worker_main(argv + list(ctx.args))


@app.command("webhooks", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run_webhooks(
    ctx: typer.Context,
    loglevel: str = "INFO",
    threads: Annotated[
        int | None, typer.Option(min=1, help="concurrent deliveries (default SECATEURS_WEBHOOK_WORKER_THREADS)")
    ] = None,
    hostname: Annotated[str | None, typer.Option(help="Celery node name")] = None,
) -> None:
    """Run the webhook worker: a Celery worker on the webhook queue only, with a pool of threads (deliveries
    wait on the network, not the CPU). Extra args go to Celery."""
    from worker.webhooks import app as celery_app

    s = celery_app.conf.secateurs_settings
    argv = [
        "worker",
        f"--loglevel={loglevel}",
        "--pool=threads",
        f"--concurrency={threads or s.webhook_worker_threads}",
        "-Q",
        s.webhooks_queue,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    celery_app.worker_main(argv + list(ctx.args))


@app.command("demo")
def demo(
    model: Annotated[
        str | None, typer.Option(help="model directory or hub id (default: the bundled tiny model)")
    ] = None,
    port: int = 8765,
    serve: Annotated[
        bool, typer.Option("--serve", help="keep the API, the worker and the dashboard up afterwards, until Ctrl-C")
    ] = False,
) -> None:
    """Start API + worker on the embedded defaults, run one real pruning job over HTTP, verify it."""
    from cli.demo import main as demo_main

    sys.exit(demo_main(model=model, port=port, serve=serve))
