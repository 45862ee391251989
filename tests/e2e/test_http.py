"""The HTTP surface of a running daemon, against a real database: the admin API with good
and bad input, auth refusals, health, metrics, an OpenAPI fuzz run, readiness through a
database outage, and the systemd notify protocol on a real datagram socket."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.e2e.conftest import Daemon, Daemons, all_finished, insert_workflows, wait_until
from tests.factories import insert_outcome_unknown_failure
from tests.proxy import CuttableProxy

TOKEN = "test-token-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def daemon(daemons: Daemons) -> Daemon:
    return daemons.start(admin_token=TOKEN)


@pytest.fixture
def api(daemon: Daemon) -> httpx.Client:
    with httpx.Client(base_url=daemon.url, headers=AUTH, timeout=10) as client:
        yield client  # type: ignore[misc]


def test_admin_endpoints_refuse_without_the_right_token(daemon: Daemon) -> None:
    missing = httpx.get(f"{daemon.url}/admin/workflows")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "Bearer" in missing.json()["detail"]
    wrong = httpx.get(f"{daemon.url}/admin/workflows", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert httpx.get(f"{daemon.url}/admin/workflows", headers=AUTH).status_code == 200
    for open_path in ("/healthz", "/readyz", "/livez", "/metrics", "/openapi.json"):
        assert httpx.get(f"{daemon.url}{open_path}").status_code == 200, open_path


def test_with_no_token_configured_the_admin_api_is_closed(daemons: Daemons) -> None:
    closed = daemons.start()
    answer = httpx.get(f"{closed.url}/admin/workflows", headers={"Authorization": "Bearer anything"})
    assert answer.status_code == 503
    assert "set WORKFLOWD_ADMIN_TOKEN" in answer.json()["detail"]
    assert httpx.get(f"{closed.url}/healthz").json()["status"] == "ready"


def test_start_is_idempotent_and_validated(api: httpx.Client, db: psycopg.Connection[Any]) -> None:
    body = {
        "type": "three_steps",
        "input": {"sleep": 0, "order": 1},
        "user_id": "u1",
        "wallet_address": "0xw",
    }
    created = api.post("/admin/workflows", json=body)
    assert created.status_code == 201
    workflow = created.json()
    assert db.execute("SELECT type FROM workflows WHERE id = %s", (workflow["id"],)).fetchone() == (
        "three_steps",
    )
    assert (workflow["type"], workflow["user_id"], workflow["wallet_address"]) == ("three_steps", "u1", "0xw")
    again = api.post("/admin/workflows", json={**body, "input": {"order": 1, "sleep": 0}})
    assert again.status_code == 200
    assert again.json()["id"] == workflow["id"]
    assert db.execute("SELECT count(*) FROM workflows").fetchone() == (1,)
    invalid = api.post(
        "/admin/workflows", json={"type": "validated", "input": {"order_id": "x"}, "user_id": "u"}
    )
    assert invalid.status_code == 422
    assert invalid.json()["errors"] == [
        "order_id: Input should be a valid integer, unable to parse string as an integer", "amount: Field required",
    ]  # fmt: skip
    for bad in ({"input": {}}, {"type": "t", "input": [1, 2]}, {"type": ""}, "not json"):
        answer = api.post("/admin/workflows", json=bad)
        assert answer.status_code == 422, bad
        assert "detail" in answer.json()
    unserved = api.post("/admin/workflows", json={"type": "nobody_serves_this", "input": {}})
    assert unserved.status_code == 422
    assert "no live worker serves workflow type 'nobody_serves_this'" in unserved.json()["detail"]
    assert {"three_steps", "validated", "trade_execution"} <= set(unserved.json()["served"])
    for_later = {"type": "nobody_serves_this", "input": {}, "allow_unserved": True}
    assert api.post("/admin/workflows", json=for_later).status_code == 201


def test_start_with_an_explicit_idempotency_key(api: httpx.Client, db: psycopg.Connection[Any]) -> None:
    body = {"type": "nobody_serves_this", "input": {"amount": 1.5, "to": "0xa"}, "user_id": "u1",
            "idempotency_key": "order-7", "allow_unserved": True}  # fmt: skip
    created = api.post("/admin/workflows", json=body)
    assert created.status_code == 201
    assert created.json()["idempotency_key"] == "order-7"
    # The same start, spelt differently: another key order, another spelling of 1.5.
    respelt = (
        '{"idempotency_key": "order-7", "user_id": "u1", "type": "nobody_serves_this", '
        '"input": {"to": "0xa", "amount": 15e-1}, "allow_unserved": true}'
    )
    again = api.post("/admin/workflows", content=respelt, headers={"Content-Type": "application/json"})
    assert again.status_code == 200
    assert again.json()["id"] == created.json()["id"]
    for different in ({"input": {"amount": 2, "to": "0xa"}}, {"user_id": "u2"}, {"type": "other"}):
        conflict = api.post("/admin/workflows", json=body | different)
        assert conflict.status_code == 409, different
        assert "idempotency key 'order-7' already belongs to workflow" in conflict.json()["detail"]
    assert db.execute("SELECT count(*) FROM workflows").fetchone() == (1,)


def test_unknown_fields_of_a_start_are_refused_not_dropped(
    api: httpx.Client, db: psycopg.Connection[Any]
) -> None:
    misspelt = api.post(
        "/admin/workflows", json={"type": "nobody_serves_this", "input": {}, "idempotency_kee": "order-8"}
    )
    assert misspelt.status_code == 422
    [error] = misspelt.json()["detail"]
    assert (error["loc"], error["type"]) == (["body", "idempotency_kee"], "extra_forbidden")
    for bad_key in ("", "k" * 513):
        answer = api.post("/admin/workflows", json={"type": "t", "idempotency_key": bad_key})
        assert answer.status_code == 422, bad_key
    assert db.execute("SELECT count(*) FROM workflows").fetchone() == (0,)


def test_retry_of_an_outcome_unknown_failure_needs_force(
    api: httpx.Client, db: psycopg.Connection[Any]
) -> None:
    staged = insert_outcome_unknown_failure(db, type="nobody_serves_this")
    refused = api.post(f"/admin/workflows/{staged['id']}/retry")
    assert refused.status_code == 409
    assert (
        "may have taken effect: check the outside service, then retry with force" in refused.json()["detail"]
    )
    assert api.get(f"/admin/workflows/{staged['id']}").json()["state"] == "failed"
    forced = api.post(f"/admin/workflows/{staged['id']}/retry", params={"force": "true"})
    assert forced.status_code == 200
    assert forced.json()["state"] == "pending"


def test_commands_are_audited_and_their_actor_is_in_the_timeline(api: httpx.Client, daemon: Daemon) -> None:
    workflow_id = api.post(
        "/admin/workflows",
        json={"type": "nobody_serves_this", "input": {}, "user_id": "u", "allow_unserved": True},
    ).json()["id"]
    assert (
        api.post(f"/admin/workflows/{workflow_id}/cancel", headers={"X-Workflowd-Actor": "alice"}).status_code
        == 200
    )
    assert api.post(f"/admin/workflows/{workflow_id}/compensate").status_code == 200
    assert api.post(f"/admin/workflows/{workflow_id}/retry").status_code == 409
    too_long = api.post(f"/admin/workflows/{workflow_id}/cancel", headers={"X-Workflowd-Actor": "a" * 129})
    assert too_long.status_code == 422
    timeline = api.get(f"/admin/workflows/{workflow_id}/timeline").json()
    assert [(event["to_state"], event["actor"]) for event in timeline] == [
        ("cancelled", "alice via admin-api:127.0.0.1"),
        ("compensating", "admin-api:127.0.0.1"),
        ("compensated", "admin-api:127.0.0.1"),
    ]

    def audit_lines() -> list[dict[str, Any]]:
        return [event for event in daemon.log_events() if event["event"] == "admin_command"]

    lines = wait_until(lambda: len(audit_lines()) == 4 and audit_lines(), 5, "four audit lines")
    assert [(line["command"], line["actor"], line["outcome"]) for line in lines] == [
        ("start", "admin-api:127.0.0.1", "created"),
        ("cancel", "alice via admin-api:127.0.0.1", "done"),
        ("compensate", "admin-api:127.0.0.1", "done"),
        ("retry", "admin-api:127.0.0.1", "refused"),
    ]
    assert {line["workflow_id"] for line in lines} == {workflow_id}
    assert {line["level"] for line in lines} == {"info"}
    assert "cannot go from compensated to pending" in lines[-1]["reason"]


def five_completed(api: httpx.Client, db: psycopg.Connection[Any]) -> list[str]:
    """Five three-step workflows started over HTTP (users u0, u1, u0, u1, u0), completed."""
    ids = [
        api.post(
            "/admin/workflows", json={"type": "three_steps", "input": {"n": n}, "user_id": f"u{n % 2}"}
        ).json()["id"]
        for n in range(5)
    ]
    wait_until(lambda: all_finished(db, 5), 20, "the workflows to complete")
    return ids


def test_the_listing_pages_filters_and_caps_its_limit(api: httpx.Client, db: psycopg.Connection[Any]) -> None:
    five_completed(api, db)
    page = api.get(
        "/admin/workflows", params={"page": 1, "limit": 2, "state": "completed", "type": "three_steps"}
    ).json()
    assert (page["total"], page["limit"], len(page["items"])) == (5, 2, 2)
    assert api.get("/admin/workflows", params={"user_id": "u0"}).json()["total"] == 3
    assert api.get("/admin/workflows", params={"limit": 5000}).json()["limit"] == 100
    assert api.get("/admin/workflows", params={"state": "bogus"}).status_code == 422
    assert api.get("/admin/workflows", params={"page": 0}).status_code == 422


def test_a_workflow_shows_its_steps_summary_and_timeline_and_unknown_ids_are_404(
    api: httpx.Client, db: psycopg.Connection[Any]
) -> None:
    first = five_completed(api, db)[0]
    detail = api.get(f"/admin/workflows/{first}").json()
    assert detail["id"] == first
    assert [step["step_name"] for step in detail["steps"]] == ["first", "second", "third"]
    assert detail["summary"]["progress_percentage"] == 100.0
    timeline = api.get(f"/admin/workflows/{first}/timeline").json()
    assert timeline[0]["to_state"] == "running"
    assert timeline[-1]["to_state"] == "completed"
    assert api.get(f"/admin/workflows/{uuid.uuid4()}").status_code == 404
    assert api.get(f"/admin/workflows/{uuid.uuid4()}/timeline").status_code == 404
    assert api.get("/admin/workflows/not-a-uuid").status_code == 422


def test_search_finds_by_id_and_user_and_an_injection_finds_nothing(
    api: httpx.Client, db: psycopg.Connection[Any]
) -> None:
    ids = five_completed(api, db)
    assert [w["id"] for w in api.get("/admin/workflows/search", params={"q": ids[1]}).json()] == [ids[1]]
    assert len(api.get("/admin/workflows/search", params={"q": "u1"}).json()) == 2
    assert api.get("/admin/workflows/search", params={"q": "x' OR '1'='1"}).json() == []
    assert api.get("/admin/workflows/search").status_code == 422


def test_stats_count_by_state_and_name_the_live_workers(
    api: httpx.Client, daemon: Daemon, db: psycopg.Connection[Any]
) -> None:
    five_completed(api, db)
    stats = api.get("/admin/workflows/stats/overview").json()
    assert stats["by_state"] == {"completed": 5}
    assert stats["completed_last_minute"] == 5
    assert [worker["pid"] for worker in stats["live_workers"]] == [daemon.pid]


def test_commands_on_a_finished_workflow_conflict_and_unknown_or_malformed_ids_are_refused(
    api: httpx.Client, db: psycopg.Connection[Any]
) -> None:
    done = api.post("/admin/workflows", json={"type": "three_steps", "input": {}, "user_id": "u"}).json()
    wait_until(
        lambda: db.execute("SELECT state FROM workflows WHERE id = %s", (done["id"],)).fetchone() == ("completed",),
        20, "completion",
    )  # fmt: skip
    for command in ("retry", "cancel", "compensate"):
        conflict = api.post(f"/admin/workflows/{done['id']}/{command}")
        assert conflict.status_code == 409, command
        assert "cannot go from completed" in conflict.json()["detail"]
        assert api.post(f"/admin/workflows/{uuid.uuid4()}/{command}").status_code == 404
        assert api.post(f"/admin/workflows/123/{command}").status_code == 422


def test_a_priority_is_given_at_start_and_changed_while_the_workflow_waits(
    api: httpx.Client, db: psycopg.Connection[Any]
) -> None:
    later = {"type": "three_steps", "input": {}, "user_id": "u", "delay_seconds": 3600}
    waiting = api.post("/admin/workflows", json=later | {"priority": -20}).json()
    assert waiting["priority"] == -20
    by_definition = api.post("/admin/workflows", json=later | {"input": {"n": 2}}).json()
    assert by_definition["priority"] == 0
    changed = api.patch(f"/admin/workflows/{waiting['id']}", json={"priority": 30})
    assert (changed.status_code, changed.json()["priority"]) == (200, 30)
    assert db.execute("SELECT priority FROM workflows WHERE id = %s", (waiting["id"],)).fetchone() == (30,)
    for bad in (
        {"priority": 101},
        {"priority": "high"},
        {"priority": 1.5},
        {},
        {"priority": 1, "state": "x"},
    ):
        assert api.patch(f"/admin/workflows/{waiting['id']}", json=bad).status_code == 422, bad
    assert api.post("/admin/workflows", json=later | {"priority": -101}).status_code == 422
    assert api.patch(f"/admin/workflows/{uuid.uuid4()}", json={"priority": 1}).status_code == 404
    api.post(f"/admin/workflows/{waiting['id']}/cancel")
    finished = api.patch(f"/admin/workflows/{waiting['id']}", json={"priority": 1})
    assert finished.status_code == 409
    assert "is cancelled: only one still to run has a priority to change" in finished.json()["detail"]


def test_limits_are_set_listed_and_reset_at_run_time(api: httpx.Client) -> None:
    changed = api.put("/admin/limits/three_steps", json={"max_concurrency": 4})
    assert changed.status_code == 200, changed.text
    assert (changed.json()["max_concurrency"], changed.json()["overridden"]) == (4, True)
    listed = {limit["type"]: limit for limit in api.get("/admin/limits").json()}
    assert listed["three_steps"]["max_concurrency"] == 4
    assert listed["limited_five"]["max_concurrency"] == 5  # its definition's, as its daemon declared it
    rated = api.put("/admin/limits/three_steps", json={"rate_limit": "600/min"}).json()
    assert (rated["max_concurrency"], rated["rate_limit"]) == (4, "600/min")  # the other one holds as it did
    for bad in ({"max_concurrency": 0}, {"max_concurrency": 2**64}, {"max_concurrency": "many"}, {},
                {"max_concurrency": 2, "rate": 1}, {"rate_limit": "10"}, {"rate_limit": "1/ms"},
                {"rate_limit": 10}, {"rate_limit": "9" * 40 + "/s"}):  # fmt: skip
        answer = api.put("/admin/limits/three_steps", json=bad)
        assert answer.status_code == 422, bad
        assert answer.json()["detail"], bad
    assert api.put("/admin/limits/" + "t" * 129, json={"max_concurrency": 1}).status_code == 422
    assert api.delete("/admin/limits/three_steps").status_code == 204
    assert "three_steps" not in {limit["type"] for limit in api.get("/admin/limits").json()}


def test_a_waiting_workflow_is_cancelled_then_compensated_with_nothing_to_undo(api: httpx.Client) -> None:
    waiting = api.post(
        "/admin/workflows",
        json={"type": "nobody_serves_this", "input": {}, "user_id": "u", "allow_unserved": True},
    ).json()
    cancelled = api.post(f"/admin/workflows/{waiting['id']}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["state"] == "cancelled"
    compensated = api.post(f"/admin/workflows/{waiting['id']}/compensate")
    assert compensated.status_code == 200
    assert compensated.json()["state"] == "compensated"  # nothing had completed: nothing to undo


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition (0 when absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        metric_name, _, label_text = sample.partition("{")
        found = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
        if metric_name == name and found == wanted:
            return float(value)
    return 0.0


def test_metrics_move_after_workflows_run(daemons: Daemons, db: psycopg.Connection[Any]) -> None:
    first, second = daemons.start(queue_depth_interval=0.3), daemons.start(queue_depth_interval=0.3)
    before = httpx.get(f"{first.url}/metrics").text
    assert metric(before, "workflowd_workflows_finished_total", type="three_steps", state="completed") == 0
    insert_workflows(db, "three_steps", 20)
    insert_workflows(db, "retrying", 1, fail_times=1)
    insert_workflows(db, "served_by_nobody", 3)
    wait_until(lambda: all_finished(db, 21), 30, "the workflows to complete")
    texts = [httpx.get(f"{daemon.url}/metrics").text for daemon in (first, second)]
    finished = sum(
        metric(t, "workflowd_workflows_finished_total", type="three_steps", state="completed") for t in texts
    )
    assert finished == 20
    assert (
        sum(
            metric(t, "workflowd_step_attempts_total", type="three_steps", step="first", outcome="succeeded")
            for t in texts
        )
        == 20
    )
    assert sum(metric(t, "workflowd_step_retries_total", type="retrying", step="flaky") for t in texts) == 1
    assert sum(metric(t, "workflowd_claim_batch_size_count") for t in texts) >= 1
    assert sum(metric(t, "workflowd_pickup_lag_seconds_count") for t in texts) >= 21
    assert (
        sum(
            metric(
                t,
                "workflowd_step_duration_seconds_count",
                type="three_steps",
                step="third",
                outcome="succeeded",
            )
            for t in texts
        )
        == 20
    )
    assert all("workflowd_steps_in_flight 0.0" in t for t in texts)

    # The queue depth (a global number) is exported by exactly one of the two daemons.
    def depths() -> list[float]:
        return sorted(
            metric(
                httpx.get(f"{d.url}/metrics").text,
                "workflowd_queue_depth",
                type="served_by_nobody",
                state="pending",
            )
            for d in (first, second)
        )

    assert wait_until(lambda: depths() == [0.0, 3.0], 10, "one daemon to export the queue depth")


def test_the_openapi_document_survives_a_fuzz_run_without_server_errors(daemon: Daemon) -> None:
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("schemathesis")), "run", f"{daemon.url}/openapi.json",
            "--checks", "not_a_server_error", "--header", f"Authorization: Bearer {TOKEN}",
            "--max-examples", "15", "--request-timeout", "10", "--suppress-health-check", "all",
        ],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:]
    assert daemon.process.poll() is None


def test_readiness_follows_the_database_through_an_outage(daemons: Daemons, db_url: str) -> None:
    parts = conninfo_to_dict(db_url)
    with CuttableProxy(str(parts.get("host", "127.0.0.1")), int(parts.get("port", 5432))).running() as proxy:
        through_proxy = make_conninfo(db_url, host="127.0.0.1", port=proxy.port)
        daemon = daemons.start({"DATABASE_URL": through_proxy})
        assert httpx.get(f"{daemon.url}/readyz").json() == {
            "status": "ready", "database": True, "schema_current": True, "draining": False,
        }  # fmt: skip
        proxy.cut()
        down = wait_until(
            lambda: (r := httpx.get(f"{daemon.url}/readyz", timeout=10)).status_code == 503 and r,
            20,
            "unready",
        )
        assert down.json()["database"] is False
        assert httpx.get(f"{daemon.url}/healthz", timeout=10).status_code == 503
        assert httpx.get(f"{daemon.url}/livez").status_code == 200  # alive, riding the outage out
        proxy.restore()
        wait_until(
            lambda: httpx.get(f"{daemon.url}/readyz", timeout=10).status_code == 200, 30, "ready again"
        )
        assert daemon.process.poll() is None


def test_systemd_hears_ready_watchdog_and_stopping(daemons: Daemons, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(10)
        daemon = daemons.start({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"}, poll_interval=0.05)
        messages = [sock.recv(1024).decode() for _ in range(3)]
        assert messages[0] == "READY=1\nSTATUS=serving"
        assert messages[1:] == ["WATCHDOG=1", "WATCHDOG=1"]
        daemon.signal(signal.SIGTERM)
        seen = []
        while "STOPPING=1" not in seen:
            seen.append(sock.recv(1024).decode())
        assert daemon.process.wait(timeout=15) == 0


def test_readiness_turns_false_as_soon_as_shutdown_starts(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    daemon = daemons.start(shutdown_grace=10)
    insert_workflows(db, "three_steps", 1, sleep=3)
    wait_until(
        lambda: db.execute("SELECT count(*) FROM test_effects").fetchone() == (1,), 15, "a step in flight"
    )
    daemon.signal(signal.SIGTERM)
    answer = wait_until(
        lambda: (r := httpx.get(f"{daemon.url}/readyz")).status_code == 503 and r, 5, "draining"
    )
    assert answer.json()["draining"] is True
    assert daemon.process.wait(timeout=15) == 0
