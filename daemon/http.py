"""The HTTP surface of one daemon: the admin API, health endpoints and Prometheus metrics.

FastAPI, served by uvicorn inside the daemon's own event loop (the daemon keeps its
signal handling). Admin endpoints need `Authorization: Bearer <WORKFLOWD_ADMIN_TOKEN>`;
with no token configured they answer 503: the admin API is never open by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Iterator
from enum import Enum
from typing import Annotated, Any, Protocol
from uuid import UUID

import psycopg
import uvicorn
from fastapi import Depends, FastAPI, Query, Request, Response, status
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg_pool import PoolTimeout
from pydantic import BaseModel, Field, JsonValue

from daemon.metrics import Metrics
from engine import (
    IllegalTransitionError,
    InputValidationError,
    InvalidWorkflowIdError,
    UnstorableValueError,
    WorkflowNotFoundError,
    WorkflowService,
    WorkflowState,
)
from engine.migrate import schema_is_current
from engine.records import (
    ExecutionSummary,
    StepRecord,
    TimelineEvent,
    WorkflowPage,
    WorkflowRecord,
    WorkflowStats,
)
from engine.service import LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX, LIST_PAGE_MAX

READINESS_TIMEOUT_SECONDS = 2.0
LIVENESS_STALL_SECONDS_MIN = 30.0
ADMIN_DISABLED_MESSAGE = (
    "the admin API is disabled because no token is configured: set WORKFLOWD_ADMIN_TOKEN to a long "
    "random secret and send it as 'Authorization: Bearer <token>'"
)


class DaemonState(Protocol):
    """What the health endpoints read from the running daemon."""

    @property
    def draining(self) -> bool: ...

    @property
    def last_loop_at(self) -> float: ...


class StartRequest(BaseModel):
    """The body of POST /admin/workflows."""

    type: str = Field(min_length=1, max_length=128)
    input: dict[str, JsonValue] = Field(default_factory=dict)
    user_id: str | None = Field(default=None, max_length=256)
    wallet_address: str | None = Field(default=None, max_length=256)


class WorkflowDetail(WorkflowRecord):
    """A workflow with its steps and its execution summary."""

    steps: list[StepRecord]
    summary: ExecutionSummary


class Problem(BaseModel):
    """Every error answer: a readable `detail`, and `errors` for invalid input."""

    detail: str
    errors: list[str] | None = None


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "missing or wrong bearer token"},
    503: {"model": Problem, "description": "no admin token configured"},
}
ONE_WORKFLOW_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    404: {"model": Problem, "description": "no workflow with this id"},
}
COMMAND_ERRORS: dict[int | str, dict[str, Any]] = {
    **ONE_WORKFLOW_ERRORS,
    409: {"model": Problem, "description": "the workflow's state does not allow this"},
}


BEARER = HTTPBearer(auto_error=False)


class BearerAuth:
    """A dependency that checks the bearer token in constant time."""

    def __init__(self, token: str | None) -> None:
        self.token = token

    async def __call__(
        self, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]
    ) -> None:
        if self.token is None:
            raise _Refusal(status.HTTP_503_SERVICE_UNAVAILABLE, ADMIN_DISABLED_MESSAGE)
        given = credentials.credentials if credentials else ""
        if not secrets.compare_digest(given.encode(), self.token.encode()):
            raise _Refusal(
                status.HTTP_401_UNAUTHORIZED, "a valid 'Authorization: Bearer <token>' header is required"
            )


class _Refusal(Exception):
    def __init__(self, status_code: int, detail: str) -> None:
        self.status_code = status_code
        self.detail = detail


def _problem(status_code: int, detail: str, **extra: Any) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status_code == status.HTTP_401_UNAUTHORIZED else None
    return JSONResponse({"detail": detail, **extra}, status_code=status_code, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Engine errors become JSON answers with the right status."""

    @app.exception_handler(_Refusal)
    async def refused(request: Request, error: _Refusal) -> JSONResponse:
        return _problem(error.status_code, error.detail)

    @app.exception_handler(WorkflowNotFoundError)
    async def not_found(request: Request, error: WorkflowNotFoundError) -> JSONResponse:
        return _problem(status.HTTP_404_NOT_FOUND, str(error))

    @app.exception_handler(InvalidWorkflowIdError)
    async def malformed_id(request: Request, error: InvalidWorkflowIdError) -> JSONResponse:
        return _problem(status.HTTP_422_UNPROCESSABLE_CONTENT, str(error))

    @app.exception_handler(IllegalTransitionError)
    async def conflict(request: Request, error: IllegalTransitionError) -> JSONResponse:
        return _problem(status.HTTP_409_CONFLICT, str(error))

    @app.exception_handler(psycopg.OperationalError)
    async def database_unavailable(request: Request, error: psycopg.OperationalError) -> JSONResponse:
        detail = " ".join(str(error).split()) or "the database is unavailable"
        return _problem(status.HTTP_503_SERVICE_UNAVAILABLE, f"database unavailable: {detail}")

    @app.exception_handler(PoolTimeout)
    async def database_busy(request: Request, error: PoolTimeout) -> JSONResponse:
        return _problem(status.HTTP_503_SERVICE_UNAVAILABLE, "database unavailable: no connection in time")

    @app.exception_handler(UnstorableValueError)
    async def unstorable(request: Request, error: UnstorableValueError) -> JSONResponse:
        return _problem(status.HTTP_422_UNPROCESSABLE_CONTENT, str(error))

    @app.exception_handler(InputValidationError)
    async def invalid_input(request: Request, error: InputValidationError) -> JSONResponse:
        return _problem(status.HTTP_422_UNPROCESSABLE_CONTENT, str(error), errors=error.messages)


def create_app(
    service: WorkflowService, daemon: DaemonState, metrics: Metrics, admin_token: str | None
) -> FastAPI:
    """The daemon's HTTP application."""
    app = FastAPI(
        title="workflowd",
        summary="Admin API, health and metrics of a workflowd daemon.",
        version="1",
        responses={422: {"model": Problem, "description": "malformed id or request"}},
    )
    install_error_handlers(app)
    add_health_routes(app, service, daemon, metrics)
    add_admin_routes(app, service, Depends(BearerAuth(admin_token)))
    return app


def add_health_routes(app: FastAPI, service: WorkflowService, daemon: DaemonState, metrics: Metrics) -> None:
    """/livez, /readyz, /healthz and /metrics: no token needed."""
    schema_ok = False

    async def readiness() -> dict[str, Any]:
        nonlocal schema_ok
        database = False
        try:
            async with asyncio.timeout(READINESS_TIMEOUT_SECONDS), service.store.connection() as conn:
                await conn.execute("SELECT 1")
                database = True
                # Once current, the schema stays current: only a migration changes it.
                schema_ok = schema_ok or await schema_is_current(conn)
        except Exception:
            database = False
        ready = database and schema_ok and not daemon.draining
        return {"status": "ready" if ready else "unready", "database": database,
                "schema_current": schema_ok, "draining": daemon.draining}  # fmt: skip

    @app.get("/livez", tags=["health"])
    async def livez(response: Response) -> dict[str, Any]:
        """The event loop answers and the worker loop went round recently."""
        silence = time.monotonic() - daemon.last_loop_at
        alive = silence < LIVENESS_STALL_SECONDS_MIN
        response.status_code = status.HTTP_200_OK if alive else status.HTTP_503_SERVICE_UNAVAILABLE
        return {"status": "alive" if alive else "stalled", "worker_loop_seconds_ago": round(silence, 3)}

    @app.get("/readyz", tags=["health"])
    async def readyz(response: Response) -> dict[str, Any]:
        """Database reachable, schema current, not draining."""
        result = await readiness()
        response.status_code = 200 if result["status"] == "ready" else status.HTTP_503_SERVICE_UNAVAILABLE
        return result

    @app.get("/healthz", tags=["health"])
    async def healthz(response: Response) -> dict[str, Any]:
        """The same answer as /readyz (the single endpoint Docker and load balancers probe)."""
        return await readyz(response)

    @app.get("/metrics", tags=["health"], response_class=Response)
    async def prometheus() -> Response:
        """Prometheus text exposition of this process's metrics."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def add_admin_routes(app: FastAPI, service: WorkflowService, auth: Any) -> None:
    """The seed's /admin/workflows endpoints, plus POST to start one."""
    prefix = "/admin/workflows"
    tags: list[str | Enum] = ["admin"]

    @app.get(prefix, dependencies=[auth], tags=tags, responses=ERRORS)
    async def list_workflows(
        page: Annotated[int, Query(ge=1, le=LIST_PAGE_MAX)] = 1,
        limit: Annotated[
            int, Query(ge=1, description=f"page size, capped at {LIST_LIMIT_MAX}")
        ] = LIST_LIMIT_DEFAULT,
        state: WorkflowState | None = None,
        type: str | None = None,
        user_id: str | None = None,
    ) -> WorkflowPage:
        """Workflows newest first, filtered by state, type and user."""
        return await service.list_workflows(page=page, limit=limit, state=state, type=type, user_id=user_id)

    @app.post(
        prefix,
        dependencies=[auth],
        tags=tags,
        status_code=201,
        responses=ERRORS | {200: {"model": WorkflowRecord}},
    )
    async def start_workflow(body: StartRequest, response: Response) -> WorkflowRecord:
        """Start a workflow: 201 when created, 200 with the existing one on a duplicate key."""
        result = await service.start(body.type, body.input, body.user_id, body.wallet_address)
        response.status_code = status.HTTP_201_CREATED if result.created else status.HTTP_200_OK
        return result.workflow

    @app.get(f"{prefix}/stats/overview", dependencies=[auth], tags=tags, responses=ERRORS)
    async def stats_overview() -> WorkflowStats:
        """Counts by state and type, recent outcomes, oldest due work, live workers, unserved types."""
        return await service.get_stats()

    @app.get(f"{prefix}/search", dependencies=[auth], tags=tags, responses=ERRORS)
    async def search(q: Annotated[str, Query(min_length=1, max_length=512)]) -> list[WorkflowRecord]:
        """Workflows whose id, idempotency key, type, user id or wallet address is `q`."""
        return await service.search_workflows(q)

    @app.get(f"{prefix}/{{workflow_id}}", dependencies=[auth], tags=tags, responses=ONE_WORKFLOW_ERRORS)
    async def get_workflow(workflow_id: UUID) -> WorkflowDetail:
        """A workflow with its steps and execution summary."""
        workflow = await service.get_workflow(workflow_id)
        steps = await service.get_steps(workflow_id)
        summary = await service.get_execution_summary(workflow_id)
        return WorkflowDetail(**workflow.model_dump(), steps=steps, summary=summary)

    @app.get(
        f"{prefix}/{{workflow_id}}/timeline", dependencies=[auth], tags=tags, responses=ONE_WORKFLOW_ERRORS
    )
    async def timeline(workflow_id: UUID) -> list[TimelineEvent]:
        """Every transition of the workflow and its steps, oldest first."""
        return await service.get_timeline(workflow_id)

    @app.post(f"{prefix}/{{workflow_id}}/retry", dependencies=[auth], tags=tags, responses=COMMAND_ERRORS)
    async def retry(workflow_id: UUID) -> WorkflowRecord:
        """Resume a failed workflow at its failed step."""
        return await service.retry_workflow(workflow_id)

    @app.post(f"{prefix}/{{workflow_id}}/cancel", dependencies=[auth], tags=tags, responses=COMMAND_ERRORS)
    async def cancel(workflow_id: UUID) -> WorkflowRecord:
        """Cancel a pending workflow at once, a running one at its next step boundary."""
        return await service.cancel_workflow(workflow_id)

    @app.post(
        f"{prefix}/{{workflow_id}}/compensate", dependencies=[auth], tags=tags, responses=COMMAND_ERRORS
    )
    async def compensate(workflow_id: UUID) -> WorkflowRecord:
        """Undo the completed steps of a failed or cancelled workflow (or re-drive a stuck undo)."""
        return await service.compensate_workflow(workflow_id)


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside the daemon's loop, leaving SIGTERM and SIGINT to the daemon."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def http_server(app: FastAPI, host: str, port: int) -> EmbeddedServer:
    config = uvicorn.Config(app, host=host, port=port, lifespan="off", access_log=False, log_config=None)
    return EmbeddedServer(config)
