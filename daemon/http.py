"""The HTTP surface of one daemon: the admin API, health endpoints and Prometheus metrics.

FastAPI, served by uvicorn inside the daemon's own event loop (the daemon keeps its
signal handling). Admin endpoints need `Authorization: Bearer <WORKFLOWD_ADMIN_TOKEN>`,
or a bearer JWT of the identity provider (WORKFLOWD_JWT_JWKS_URL) with the scope the
request needs (`workflows:read` for GET, `workflows:write` for the rest); with neither
configured they answer 503: the admin API is never open by default. The token, its
scope and the size of the body are checked by `daemon.http_guard` before any body is
read; every command that changes a workflow is logged with who asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Iterator
from decimal import Decimal
from enum import Enum
from typing import Annotated, Any, Protocol
from uuid import UUID

import h11
import psycopg
import structlog
import uvicorn
from fastapi import Depends, FastAPI, Header, Path, Query, Request, Response, status
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg_pool import PoolTimeout
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, JsonValue
from uvicorn.protocols.http.h11_impl import H11Protocol

from daemon.health import Readiness, ReplicaLag
from daemon.http_guard import RequestGuard, is_admin_path, principal_of, problem, required_scope
from daemon.jwt_auth import READ_SCOPE, WRITE_SCOPE, JwtVerifier
from daemon.metrics import Metrics
from daemon.settings import HTTP_HEAD_TIMEOUT_SECONDS_DEFAULT, JwtSettings
from daemon.tracing import RequestTraceContext, untraced_request
from engine import (
    EventRefusedError,
    IdempotencyKeyConflictError,
    IllegalTransitionError,
    InputValidationError,
    InvalidLimitError,
    InvalidPriorityError,
    InvalidStartTimeError,
    InvalidWorkflowIdError,
    PriorityRefusedError,
    Schedule,
    ScheduleError,
    ScheduleNotFoundError,
    UnservedTypeError,
    UnstorableValueError,
    WorkflowEngineError,
    WorkflowNotFoundError,
    WorkflowService,
    WorkflowState,
)
from engine.definitions import PRIORITY_MAX, PRIORITY_MIN
from engine.limits import CONCURRENCY_LIMIT_MAX, UNCHANGED
from engine.records import (
    ExecutionSummary,
    LimitRecord,
    ScheduleRecord,
    StepRecord,
    TimelineEvent,
    WorkflowPage,
    WorkflowRecord,
    WorkflowStats,
)
from engine.schedules import MissedTicks
from engine.service import (
    IDEMPOTENCY_KEY_MAX_LENGTH,
    LIST_LIMIT_DEFAULT,
    LIST_LIMIT_MAX,
    LIST_PAGE_MAX,
    SEARCH_QUERY_MAX_LENGTH,
    START_DELAY_MAX_SECONDS,
)

LOG = structlog.get_logger("workflowd")
LIVENESS_STALL_SECONDS_MIN = 30.0
ACTOR_HEADER_MAX_LENGTH = 128


class DaemonState(Protocol):
    """What the health endpoints read from the running daemon."""

    @property
    def draining(self) -> bool: ...

    @property
    def last_loop_at(self) -> float: ...


class StartRequest(BaseModel):
    """The body of POST /admin/workflows. A field it does not know is refused, never
    dropped: a misspelt `idempotency_key` must not quietly start a second workflow."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(min_length=1, max_length=128)
    input: dict[str, JsonValue] = Field(default_factory=dict)
    user_id: str | None = Field(default=None, max_length=256)
    wallet_address: str | None = Field(default=None, max_length=256)
    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=IDEMPOTENCY_KEY_MAX_LENGTH,
        description="your own key for this start (default: computed from type, user and input); "
        "reusing it for a different start is refused with 409",
    )
    start_at: AwareDatetime | None = Field(
        default=None, description="when it may start (RFC 3339, with a time zone); not before"
    )
    delay_seconds: float | None = Field(
        default=None,
        ge=0,
        le=START_DELAY_MAX_SECONDS,
        allow_inf_nan=False,
        description="start it this many seconds from now, not before",
    )
    priority: int | None = Field(
        default=None,
        ge=PRIORITY_MIN,
        le=PRIORITY_MAX,
        description="smaller runs first (default: the type's definition's, else 0)",
    )
    allow_unserved: bool = Field(
        default=False,
        description="start it even if no live worker serves the type (for a worker yet to come); "
        "without it such a start is refused with 422, naming the served types",
    )


class ChangeRequest(BaseModel):
    """The body of PATCH /admin/workflows/{id}."""

    model_config = ConfigDict(extra="forbid")

    priority: int = Field(ge=PRIORITY_MIN, le=PRIORITY_MAX, description="smaller runs first")


async def exact_body(request: Request) -> dict[str, Any]:
    """A validated request's JSON body with its numbers as sent: a fraction read as a
    binary float would lose digits of an amount (1.000000000000000001)."""
    body: dict[str, Any] = json.loads(await request.body(), parse_float=Decimal)
    return body


async def exact_input(request: Request) -> dict[str, Any]:
    """The `input` of a validated start request, its numbers as sent."""
    return dict((await exact_body(request))["input"])


class WorkflowDetail(WorkflowRecord):
    """A workflow with its steps and its execution summary."""

    steps: list[StepRecord]
    summary: ExecutionSummary


class Problem(BaseModel):
    """Every error answer: a readable `detail`, and `errors` for invalid input."""

    detail: str
    errors: list[str] | None = None
    served: list[str] | None = None


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "missing, wrong, expired or otherwise invalid bearer token"},
    403: {"model": Problem, "description": "a JWT without the scope the request needs"},
    503: {"model": Problem, "description": "no admin token or JWKS configured, or the JWKS unreachable"},
}
START_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    409: {"model": Problem, "description": "the idempotency key belongs to a different start"},
    413: {"model": Problem, "description": "the body is larger than WORKFLOWD_MAX_BODY_BYTES"},
}
ONE_WORKFLOW_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    404: {"model": Problem, "description": "no workflow with this id"},
}
COMMAND_ERRORS: dict[int | str, dict[str, Any]] = {
    **ONE_WORKFLOW_ERRORS,
    409: {"model": Problem, "description": "the workflow's state does not allow this"},
}

# Only for the OpenAPI document (it declares the bearer scheme on the admin routes):
# the token itself is checked by RequestGuard, before the body is read.
BEARER_SCHEME = "HTTPBearer"
ADMIN_SECURITY = Depends(
    HTTPBearer(
        auto_error=False,
        scheme_name=BEARER_SCHEME,
        bearerFormat="JWT, or the static admin token",
        description="WORKFLOWD_ADMIN_TOKEN (every scope), or a JWT of the identity provider whose "
        f"JWKS is at WORKFLOWD_JWT_JWKS_URL, with its scopes in the `scope` claim: `{READ_SCOPE}` "
        f"for GET, `{WRITE_SCOPE}` for POST, PUT, PATCH and DELETE (each operation names its "
        "scope). Checked before the body is read.",
    )
)


def install_error_handlers(app: FastAPI) -> None:
    """Engine errors become JSON answers with the right status."""

    @app.exception_handler(ScheduleNotFoundError)
    async def no_schedule(request: Request, error: ScheduleNotFoundError) -> JSONResponse:
        return problem(status.HTTP_404_NOT_FOUND, str(error))

    @app.exception_handler(ScheduleError)
    async def bad_schedule(request: Request, error: ScheduleError) -> JSONResponse:
        return problem(status.HTTP_422_UNPROCESSABLE_CONTENT, str(error))

    @app.exception_handler(WorkflowNotFoundError)
    async def not_found(request: Request, error: WorkflowNotFoundError) -> JSONResponse:
        return problem(status.HTTP_404_NOT_FOUND, str(error))

    @app.exception_handler(InvalidWorkflowIdError)
    async def malformed_id(request: Request, error: InvalidWorkflowIdError) -> JSONResponse:
        return problem(status.HTTP_422_UNPROCESSABLE_CONTENT, str(error))

    @app.exception_handler(EventRefusedError)
    @app.exception_handler(PriorityRefusedError)
    async def refused(request: Request, error: EventRefusedError | PriorityRefusedError) -> JSONResponse:
        return problem(status.HTTP_409_CONFLICT, str(error))

    @app.exception_handler(IllegalTransitionError)
    async def conflict(request: Request, error: IllegalTransitionError) -> JSONResponse:
        return problem(status.HTTP_409_CONFLICT, str(error))

    @app.exception_handler(IdempotencyKeyConflictError)
    async def key_taken(request: Request, error: IdempotencyKeyConflictError) -> JSONResponse:
        return problem(status.HTTP_409_CONFLICT, str(error))

    @app.exception_handler(psycopg.OperationalError)
    async def database_unavailable(request: Request, error: psycopg.OperationalError) -> JSONResponse:
        detail = " ".join(str(error).split()) or "the database is unavailable"
        return problem(status.HTTP_503_SERVICE_UNAVAILABLE, f"database unavailable: {detail}")

    @app.exception_handler(psycopg.errors.ReadOnlySqlTransaction)
    async def database_read_only(
        request: Request, error: psycopg.errors.ReadOnlySqlTransaction
    ) -> JSONResponse:
        return problem(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "database unavailable: the server refuses writes (a failover?)",
        )

    @app.exception_handler(PoolTimeout)
    async def database_busy(request: Request, error: PoolTimeout) -> JSONResponse:
        return problem(status.HTTP_503_SERVICE_UNAVAILABLE, "database unavailable: no connection in time")

    @app.exception_handler(UnstorableValueError)
    async def unstorable(request: Request, error: UnstorableValueError) -> JSONResponse:
        return problem(status.HTTP_422_UNPROCESSABLE_CONTENT, str(error))

    @app.exception_handler(InvalidStartTimeError)
    @app.exception_handler(InvalidPriorityError)
    @app.exception_handler(InvalidLimitError)
    async def invalid_value(
        request: Request, error: InvalidStartTimeError | InvalidPriorityError | InvalidLimitError
    ) -> JSONResponse:
        return problem(status.HTTP_422_UNPROCESSABLE_CONTENT, str(error))

    @app.exception_handler(UnservedTypeError)
    async def unserved(request: Request, error: UnservedTypeError) -> JSONResponse:
        return problem(status.HTTP_422_UNPROCESSABLE_CONTENT, str(error), served=error.served)

    @app.exception_handler(InputValidationError)
    async def invalid_input(request: Request, error: InputValidationError) -> JSONResponse:
        return problem(status.HTTP_422_UNPROCESSABLE_CONTENT, str(error), errors=error.messages)


def create_app(
    service: WorkflowService,
    daemon: DaemonState,
    metrics: Metrics,
    readiness: Readiness,
    *,
    admin_token: str | None,
    max_body_bytes: int,
    replica: ReplicaLag | None = None,
    jwt: JwtSettings | None = None,
) -> FastAPI:
    """The daemon's HTTP application; `jwt`: accept bearer JWTs verified so. A workflow
    an admin request starts continues the request's trace (daemon/tracing.py)."""
    app = FastAPI(
        title="workflowd",
        summary="Admin API, health and metrics of a workflowd daemon.",
        version="1",
        responses={422: {"model": Problem, "description": "malformed id or request"}},
        # FastAPI's own OpenTelemetry spans, made while a tracer provider is installed:
        # for the admin API, not for probes and scrapers.
        telemetry={"exclude": untraced_request},
    )
    verifier = JwtVerifier(jwt) if jwt is not None else None
    app.add_middleware(RequestGuard, admin_token=admin_token, max_body_bytes=max_body_bytes, jwt=verifier)
    app.add_middleware(RequestTraceContext)
    install_error_handlers(app)
    add_health_routes(app, readiness, daemon, metrics, replica)
    add_admin_routes(app, service)
    add_schedule_routes(app, service)
    add_limit_routes(app, service)
    app.openapi = lambda: openapi_with_scopes(app)  # type: ignore[method-assign]
    return app


def openapi_with_scopes(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document, each admin operation naming the scope it needs (OpenAPI 3.1
    allows scopes for an http scheme), from `required_scope`: the guard's own rule, so the
    document cannot say otherwise."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    document = FastAPI.openapi(app)  # FastAPI's own, which it keeps in app.openapi_schema
    for path, operations in document.get("paths", {}).items():
        if is_admin_path(path):
            for method, operation in operations.items():
                operation["security"] = [{BEARER_SCHEME: [required_scope(method)]}]
    return document


def add_health_routes(
    app: FastAPI, readiness: Readiness, daemon: DaemonState, metrics: Metrics, replica: ReplicaLag | None
) -> None:
    """/livez, /readyz, /healthz and /metrics: no token needed, and none of them waits for
    the admin API's connections."""

    async def ready() -> dict[str, Any]:
        health = await readiness.check()
        # Draining is read live, not from the cached answer: it must show at once.
        draining = daemon.draining
        ok = health.database and health.schema_current and not draining
        answer: dict[str, Any] = {"status": "ready" if ok else "unready", "database": health.database,
                                  "schema_current": health.schema_current, "draining": draining}  # fmt: skip
        if replica is not None:
            # Shown, not judged: a lagging replica slows dashboards, not the daemon.
            lag = await replica.check()
            answer["read_replica"] = {"reachable": lag.reachable, "lag_seconds": lag.lag_seconds}
        return answer

    @app.get("/livez", tags=["health"])
    async def livez(response: Response) -> dict[str, Any]:
        """The event loop answers and the worker loop went round recently."""
        silence = time.monotonic() - daemon.last_loop_at
        alive = silence < LIVENESS_STALL_SECONDS_MIN
        response.status_code = status.HTTP_200_OK if alive else status.HTTP_503_SERVICE_UNAVAILABLE
        return {"status": "alive" if alive else "stalled", "worker_loop_seconds_ago": round(silence, 3)}

    @app.get("/readyz", tags=["health"])
    async def readyz(response: Response) -> dict[str, Any]:
        """Database reachable, schema current, not draining (the database's answer is at
        most a second old)."""
        result = await ready()
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


def operator(
    request: Request,
    x_workflowd_actor: Annotated[
        str | None,
        Header(
            max_length=ACTOR_HEADER_MAX_LENGTH,
            description="who you are, for the audit log and the timeline (default: your address); "
            "ignored with a JWT, whose subject is who you are",
        ),
    ] = None,
) -> str:
    """Who asks for a command: a JWT's subject; with the admin token, the client's address,
    and the name it gives if it gives one.

    The subject is the identity provider's word, checked with its signature. The name is
    the caller's word (anyone with the token may claim any name); the address is what the
    server saw.
    """
    principal = principal_of(request.scope)
    if principal is not None and principal.subject is not None:
        return principal.subject
    address = request.client.host if request.client else "unknown"
    actor = f"admin-api:{address}"
    return f"{x_workflowd_actor} via {actor}" if x_workflowd_actor else actor


OperatorActor = Annotated[str, Depends(operator)]


def audit(command: str, actor: str, workflow_id: UUID, outcome: str, **facts: Any) -> None:
    """The audit line of a command that changes a workflow: who, what, which, how it went."""
    LOG.info("admin_command", command=command, actor=actor, workflow_id=str(workflow_id), outcome=outcome,
             **facts)  # fmt: skip


async def audited(
    command: str, actor: str, workflow_id: UUID, outcome: Awaitable[WorkflowRecord]
) -> WorkflowRecord:
    """Run a command on a workflow and log it, done or refused."""
    try:
        workflow = await outcome
    except WorkflowEngineError as error:
        audit(command, actor, workflow_id, "refused", reason=str(error))
        raise
    audit(command, actor, workflow_id, "done", state=workflow.state.value)
    return workflow


def add_admin_routes(app: FastAPI, service: WorkflowService) -> None:
    """The seed's /admin/workflows endpoints, plus POST to start one."""
    prefix = "/admin/workflows"
    tags: list[str | Enum] = ["admin"]
    auth = ADMIN_SECURITY

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
        responses=START_ERRORS | {200: {"model": WorkflowRecord}},
    )
    async def start_workflow(
        body: StartRequest, request: Request, response: Response, actor: OperatorActor
    ) -> WorkflowRecord:
        """Start a workflow: 201 when created, 200 with the existing one on a duplicate key
        (409 if that key belongs to a different type, user or input)."""
        input = await exact_input(request) if body.input else body.input
        try:
            result = await service.start(
                body.type,
                input,
                body.user_id,
                body.wallet_address,
                priority=body.priority,
                idempotency_key=body.idempotency_key,
                require_served=not body.allow_unserved,
                start_at=body.start_at,
                delay_seconds=body.delay_seconds,
            )
        except IdempotencyKeyConflictError as error:
            audit("start", actor, error.workflow_id, "refused", reason=str(error))
            raise
        workflow = result.workflow
        audit("start", actor, workflow.id, "created" if result.created else "existing", type=workflow.type)
        response.status_code = status.HTTP_201_CREATED if result.created else status.HTTP_200_OK
        return workflow

    @app.get(f"{prefix}/stats/overview", dependencies=[auth], tags=tags, responses=ERRORS)
    async def stats_overview() -> WorkflowStats:
        """Counts by state and type, recent outcomes, oldest due work, live workers, unserved types."""
        return await service.get_stats()

    @app.get(f"{prefix}/search", dependencies=[auth], tags=tags, responses=ERRORS)
    async def search(
        q: Annotated[str, Query(min_length=1, max_length=SEARCH_QUERY_MAX_LENGTH)],
    ) -> list[WorkflowRecord]:
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
    async def retry(
        workflow_id: UUID,
        actor: OperatorActor,
        force: Annotated[
            bool,
            Query(description="retry a workflow whose outcome is unknown (check the outside service first)"),
        ] = False,
    ) -> WorkflowRecord:
        """Resume a failed workflow at its failed step (an outcome-unknown failure only with force)."""
        command = "retry --force" if force else "retry"
        return await audited(
            command, actor, workflow_id, service.retry_workflow(workflow_id, force=force, actor=actor)
        )

    @app.post(f"{prefix}/{{workflow_id}}/cancel", dependencies=[auth], tags=tags, responses=COMMAND_ERRORS)
    async def cancel(workflow_id: UUID, actor: OperatorActor) -> WorkflowRecord:
        """Cancel a pending workflow at once, a running one at its next step boundary."""
        return await audited("cancel", actor, workflow_id, service.cancel_workflow(workflow_id, actor=actor))

    @app.patch(f"{prefix}/{{workflow_id}}", dependencies=[auth], tags=tags, responses=COMMAND_ERRORS)
    async def change(workflow_id: UUID, body: ChangeRequest, actor: OperatorActor) -> WorkflowRecord:
        """Change a workflow still to run: its priority (its next claim goes by it). 409: a
        finished one."""
        command = f"set priority {body.priority}"
        return await audited(command, actor, workflow_id, service.set_priority(workflow_id, body.priority))

    @app.post(
        f"{prefix}/{{workflow_id}}/compensate", dependencies=[auth], tags=tags, responses=COMMAND_ERRORS
    )
    async def compensate(workflow_id: UUID, actor: OperatorActor) -> WorkflowRecord:
        """Undo the completed steps of a failed or cancelled workflow (or re-drive a stuck undo)."""
        return await audited(
            "compensate", actor, workflow_id, service.compensate_workflow(workflow_id, actor=actor)
        )

    @app.post(
        f"{prefix}/{{workflow_id}}/events", dependencies=[auth], tags=tags, status_code=202,
        responses=COMMAND_ERRORS,
    )  # fmt: skip
    async def send_event(
        workflow_id: UUID, body: EventRequest, request: Request, actor: OperatorActor
    ) -> EventSent:
        """Send an event to a workflow, for a step that waits for it (now, or when the
        workflow gets there): its payload becomes the step's output. `delivered` is false
        for a duplicate (the same `id`; by default the same name and payload). 404: no such
        workflow; 409: a finished one."""
        payload = (await exact_body(request)).get("payload")
        delivered = await service.send_event(workflow_id, body.name, payload, event_id=body.id)
        outcome = "delivered" if delivered else "duplicate"
        audit("send_event", actor, workflow_id, outcome, event_name=body.name)
        return EventSent(delivered=delivered)


class EventRequest(BaseModel):
    """The body of POST /admin/workflows/{id}/events."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    payload: JsonValue = None
    id: str | None = Field(default=None, min_length=1, max_length=512, description="the sender's event id")


class EventSent(BaseModel):
    delivered: bool


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside the daemon's loop, leaving SIGTERM and SIGINT to the daemon."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HeadDeadlineProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with a deadline for each request's head.

    uvicorn waits for a head as long as the client likes (its keep-alive timer stops at
    the first byte), so clients sending a byte now and then could hold connections up to
    the cap and starve the probes. The deadline runs from the connection, or from the
    first byte after a response, and is not pushed back by more bytes.
    """

    head_timeout = HTTP_HEAD_TIMEOUT_SECONDS_DEFAULT
    head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            self._arm_head_deadline()  # a new request begins: its head has until then
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is in
            self._disarm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        if self.head_deadline is None:
            self.head_deadline = asyncio.get_running_loop().call_later(self.head_timeout, self._head_too_slow)

    def _disarm_head_deadline(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def _head_too_slow(self) -> None:
        self.head_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def http_server(
    app: FastAPI, host: str, port: int, *, max_connections: int, head_timeout: float
) -> EmbeddedServer:
    """uvicorn for `app`; beyond `max_connections` open connections, requests get 503; a
    request head slower than `head_timeout` seconds closes its connection."""
    protocol = type("Protocol", (HeadDeadlineProtocol,), {"head_timeout": head_timeout})
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="off",
        access_log=False,
        log_config=None,
        limit_concurrency=max_connections,
        http=protocol,
    )
    return EmbeddedServer(config)


class ScheduleRequest(BaseModel):
    """The body of POST /admin/schedules (see `workflowd schedule add`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    cron: str = Field(min_length=1, max_length=200, description="five fields, or six with seconds last")
    type: str = Field(min_length=1, max_length=128)
    input: dict[str, JsonValue] = Field(default_factory=dict)
    user_id: str | None = Field(default=None, max_length=256)
    timezone: str = Field(default="UTC", max_length=64, description="an IANA time zone")
    missed: MissedTicks = "latest"
    allow_unserved: bool = False


def add_schedule_routes(app: FastAPI, service: WorkflowService) -> None:
    """/admin/schedules: cron schedules, as `workflowd schedule` manages them."""
    prefix = "/admin/schedules"
    tags: list[str | Enum] = ["schedules"]
    auth = ADMIN_SECURITY
    missing: dict[int | str, dict[str, Any]] = {
        404: {"model": Problem, "description": "no schedule of that name"}
    }

    def logged(command: str, actor: str, name: str) -> None:
        LOG.info("admin_command", command=command, actor=actor, schedule=name, outcome="done")

    @app.get(prefix, dependencies=[auth], tags=tags, responses=ERRORS)
    async def list_schedules() -> list[ScheduleRecord]:
        """Every schedule, with its next tick and its last."""
        return await service.list_schedules()

    @app.post(prefix, dependencies=[auth], tags=tags, status_code=201, responses=ERRORS)
    async def add_schedule(body: ScheduleRequest, actor: OperatorActor) -> ScheduleRecord:
        """Add a schedule, or change the one of that name (422: a bad expression, zone, input
        or type)."""
        schedule = Schedule(name=body.name, cron=body.cron, type=body.type, input=body.input,
                            user_id=body.user_id, timezone=body.timezone, missed=body.missed)  # fmt: skip
        record = await service.add_schedule(schedule, require_served=not body.allow_unserved)
        logged("schedule_add", actor, record.name)
        return record

    @app.post(prefix + "/{name}/pause", dependencies=[auth], tags=tags, responses=ERRORS | missing)
    async def pause_schedule(name: str, actor: OperatorActor) -> ScheduleRecord:
        """Fire no more ticks until resumed."""
        record = await service.pause_schedule(name)
        logged("schedule_pause", actor, name)
        return record

    @app.post(prefix + "/{name}/resume", dependencies=[auth], tags=tags, responses=ERRORS | missing)
    async def resume_schedule(name: str, actor: OperatorActor) -> ScheduleRecord:
        """Fire again from the next tick after now."""
        record = await service.resume_schedule(name)
        logged("schedule_resume", actor, name)
        return record

    @app.delete(
        prefix + "/{name}", dependencies=[auth], tags=tags, status_code=204, responses=ERRORS | missing
    )
    async def remove_schedule(name: str, actor: OperatorActor) -> Response:
        """Delete a schedule; the workflows it started stay."""
        await service.remove_schedule(name)
        logged("schedule_remove", actor, name)
        return Response(status_code=204)


# A workflow type in a path, as long as a type may be.
TypeName = Annotated[str, Path(min_length=1, max_length=128)]


class LimitRequest(BaseModel):
    """The body of PUT /admin/limits/{type}: either limit or both; one left out holds as it did."""

    model_config = ConfigDict(extra="forbid")

    max_concurrency: int | None = Field(
        default=None,
        ge=1,
        le=CONCURRENCY_LIMIT_MAX,
        description="at most this many of the type's workflows hold a lease at once; null: no limit",
    )
    rate_limit: str | None = Field(
        default=None,
        max_length=32,
        description='at most this many step starts per period, as "10/s" or "600/min"; null: no limit',
        examples=["10/s"],
    )

    def given(self, name: str) -> Any:
        """The field's value if the body names it, else UNCHANGED."""
        return getattr(self, name) if name in self.model_fields_set else UNCHANGED


def add_limit_routes(app: FastAPI, service: WorkflowService) -> None:
    """/admin/limits: concurrency limits set at run time, as `workflowd limits` sets them."""
    prefix = "/admin/limits"
    tags: list[str | Enum] = ["limits"]
    auth = ADMIN_SECURITY

    @app.get(prefix, dependencies=[auth], tags=tags, responses=ERRORS)
    async def list_limits() -> list[LimitRecord]:
        """Every type with a limit, with its workflows in flight and due now."""
        return await service.list_limits()

    @app.put(prefix + "/{type}", dependencies=[auth], tags=tags, responses=ERRORS)
    async def set_limit(type: TypeName, body: LimitRequest, actor: OperatorActor) -> LimitRecord:
        """Set a type's limits over its definition's (null: none); the daemons hold to
        them within 2 s."""
        concurrency, rate = body.given("max_concurrency"), body.given("rate_limit")
        record = await service.set_limit(type, concurrency, rate_limit=rate, actor=actor)
        LOG.info(
            "admin_command",
            command="limit_set",
            actor=actor,
            type=type,
            **body.model_dump(exclude_unset=True),
        )
        return record

    @app.delete(prefix + "/{type}", dependencies=[auth], tags=tags, status_code=204, responses=ERRORS)
    async def reset_limit(type: TypeName, actor: OperatorActor) -> Response:
        """Back to the definition's limits."""
        await service.reset_limit(type)
        LOG.info("admin_command", command="limit_reset", actor=actor, type=type)
        return Response(status_code=204)
