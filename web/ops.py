"""Operations endpoints: liveness, readiness, Prometheus metrics, and the OpenAPI document."""

from __future__ import annotations

from flask import Blueprint, Response
from prometheus_client import CONTENT_TYPE_LATEST

from web.http import json_response, services
from web.openapi import openapi_document

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    return json_response({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response:
    """Ready when Postgres and Redis answer and the process is not draining."""
    svc = services()
    checks = {"database": "ok", "redis": "ok", "draining": svc.draining}
    try:
        with svc.pool.connection(timeout_s=1.0) as conn:
            svc.store.ping(conn)
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        checks["database"] = f"unavailable: {type(exc).__name__}"
    try:
        svc.redis.ping()
    except Exception as exc:  # noqa: BLE001
        checks["redis"] = f"unavailable: {type(exc).__name__}"
    ready = checks["database"] == "ok" and checks["redis"] == "ok" and not svc.draining
    return json_response(
        {"status": "ready" if ready else "not-ready", **checks},
        200 if ready else 503,
        headers=None if ready else {"Retry-After": "2"},
    )


@bp.get("/metrics")
def metrics() -> Response:
    svc = services()
    return Response(svc.metrics.exposition(svc), mimetype=CONTENT_TYPE_LATEST)


@bp.get("/openapi.json")
def openapi() -> Response:
    return json_response(openapi_document())
