"""/healthz (process), /readyz (database, broker, storage), /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api.problems import PROBLEM, RETRY_AFTER_S, error_responses, problem
from api.schemas import Health, Ready

router = APIRouter(tags=["operations"])

NOT_READY = error_responses(503)
NOT_READY[503]["content"][PROBLEM]["example"].update(
    type="about:blank", detail="database: error: OperationalError", code="not_ready"
)


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Ready,
    summary="Readiness: database, broker and storage reachable",
    responses=NOT_READY,
)
def readyz(request: Request) -> Ready | Response:
    st = request.app.state
    checks: dict[str, str] = {}
    try:
        with st.sessions() as s:
            s.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as e:  # noqa: BLE001
        checks["database"] = f"error: {e.__class__.__name__}"
    try:
        st.queue.check()
        checks["broker"] = "ok"
    except Exception as e:  # noqa: BLE001
        checks["broker"] = f"error: {e.__class__.__name__}"
    try:
        st.storage.check()
        checks["storage"] = "ok"
    except Exception as e:  # noqa: BLE001
        checks["storage"] = f"error: {e.__class__.__name__}"
    bad = {k: v for k, v in checks.items() if v != "ok"}
    if bad:
        return problem(
            503,
            "Service Unavailable",
            "; ".join(f"{k}: {v}" for k, v in bad.items()),
            instance="/readyz",
            code="not_ready",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    return Ready(status="ok", checks=checks)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
