"""The `workflowd` CLI as a user runs it: a real process against a real database."""

from __future__ import annotations

import getpass
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from daemon.local_postgres import free_port
from tests.factories import insert_outcome_unknown_failure, insert_step, insert_workflow

DB_VARIABLES = (
    "DATABASE_URL",
    "DB_HOST",
    "DB_PORT",
    "DB_USERNAME",
    "DB_PASSWORD",
    "DB_DATABASE",
    "WORKFLOWD_MODULES",
)


def workflowd(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    base = {name: value for name, value in os.environ.items() if name not in DB_VARIABLES}
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert result.returncode == code, result
    assert result.stderr.startswith("workflowd: ")
    assert result.stderr.count("\n") == 1, result.stderr
    assert text in result.stderr
    assert "Traceback" not in result.stderr


def test_start_prints_the_workflow_as_json_and_is_idempotent(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    env = {"DATABASE_URL": db_url}
    first = workflowd(
        "start",
        "contract_deployment",
        "--input",
        '{"contractName": "Token", "contractCode": "0x60", "constructorArgs": [1]}',
        "--user",
        "u1",
        "--wallet",
        "0xw",
        "--json",
        env=env,
    )
    assert first.returncode == 0, first.stderr
    document = json.loads(first.stdout)
    assert document["created"] is True
    assert document["state"] == "pending"
    assert (document["type"], document["user_id"], document["wallet_address"]) == (
        "contract_deployment",
        "u1",
        "0xw",
    )
    again = workflowd(
        "start",
        "contract_deployment",
        "--input",
        '{"constructorArgs": [1.0], "contractCode": "0x60", "contractName": "Token"}',
        "--user",
        "u1",
        "--json",
        env=env,
    )
    assert json.loads(again.stdout)["id"] == document["id"]
    assert json.loads(again.stdout)["created"] is False
    assert db.execute("SELECT count(*) FROM workflows").fetchone() == (1,)


def test_start_prints_a_readable_summary(db_url: str) -> None:
    result = workflowd(
        "start", "reward_grant", "--input", '{"amount": 5, "reason": "hi"}', "--user", "u1",
        env={"DATABASE_URL": db_url},
    )  # fmt: skip
    assert result.returncode == 0
    assert result.stdout.startswith("started: workflow ")
    assert "idempotency key  workflow:reward_grant:u1:" in result.stdout


def test_start_takes_a_time_or_a_delay_and_says_when_it_starts(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    grant = ("start", "reward_grant", "--input", '{"amount": 5, "reason": "hi"}')
    at = workflowd(*grant, "--user", "u1", "--at", "2030-01-02T03:04:05Z", env={"DATABASE_URL": db_url})
    assert at.returncode == 0, at.stderr
    assert "  starts at        2030-01-02T03:04:05+00:00" in at.stdout
    later = workflowd(*grant, "--user", "u2", "--delay", "3600", env={"DATABASE_URL": db_url})
    assert "  starts at        " in later.stdout
    (delay,) = db.execute(
        "SELECT extract(epoch FROM next_retry_at - created_at) FROM workflows WHERE user_id = 'u2'"
    ).fetchone()  # type: ignore[misc]
    assert 3599 < delay < 3601
    assert "starts at" not in workflowd(*grant, "--user", "u3", env={"DATABASE_URL": db_url}).stdout


def test_start_refuses_a_type_nothing_serves_and_names_the_served_types(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    env = {"DATABASE_URL": db_url}
    refused = workflowd("start", "report", "--user", "u1", env=env)
    assert_one_line_error(refused, 1, "no definition here and no live worker serves workflow type 'report'")
    assert "served types: ai_job_chain, contract_deployment, indexing_verification," in refused.stderr
    assert "--allow-unserved" in refused.stderr
    assert db.execute("SELECT count(*) FROM workflows").fetchone() == (0,)
    # A live worker elsewhere serves it: started, and so is one for a worker yet to come.
    db.execute(
        "INSERT INTO workflow_workers (id, host, pid, types, concurrency) VALUES ('w1', 'h', 1, '{report}', 1)"
    )
    assert workflowd("start", "report", "--user", "u1", env=env).returncode == 0
    later = workflowd("start", "invoice", "--user", "u1", "--allow-unserved", env=env)
    assert later.returncode == 0, later.stderr
    assert db.execute("SELECT type FROM workflows ORDER BY type").fetchall() == [("invoice",), ("report",)]
    # A worker that stopped, or went silent, serves nothing.
    db.execute("UPDATE workflow_workers SET last_seen_at = now() - interval '1 hour'")
    assert workflowd("start", "report", "--user", "u2", env=env).returncode == 1


def test_the_seed_database_variables_are_accepted(db_url: str) -> None:
    parts = psycopg.conninfo.conninfo_to_dict(db_url)
    env = {
        "DB_HOST": str(parts.get("host", "127.0.0.1")),
        "DB_PORT": str(parts.get("port", 5432)),
        "DB_USERNAME": str(parts.get("user", "postgres")),
        "DB_PASSWORD": str(parts.get("password", "")),
        "DB_DATABASE": str(parts["dbname"]),
    }
    assert workflowd("migrate", env=env).stdout == "the schema is up to date\n"


def test_start_validates_input_with_modules_from_the_setting(db_url: str, tmp_path: Path) -> None:
    (tmp_path / "my_flows.py").write_text(
        "from pydantic import BaseModel\n"
        "from engine import Step, Workflow\n"
        "class Grant(BaseModel):\n    amount: int\n"
        "grant = Workflow(type='grant', steps=[Step('give', lambda input, ctx: None)], input_model=Grant)\n"
    )
    env = {"DATABASE_URL": db_url, "WORKFLOWD_MODULES": "my_flows", "PYTHONPATH": str(tmp_path)}
    result = workflowd("start", "grant", "--input", '{"amount": "many"}', "--user", "u1", env=env)
    assert_one_line_error(
        result,
        1,
        "invalid input for workflow type 'grant': amount: Input should be a valid integer",
    )


def test_modules_are_loaded_from_a_file_path_in_the_current_folder(db_url: str, tmp_path: Path) -> None:
    (tmp_path / "flows.py").write_text(
        "from pydantic import BaseModel\n"
        "from engine import Step, Workflow\n"
        "class Hello(BaseModel):\n    name: str\n"
        "hello = Workflow(type='hello', steps=[Step('greet', lambda input, ctx: None)], input_model=Hello)\n"
    )
    env = {"DATABASE_URL": db_url, "WORKFLOWD_MODULES": "./flows.py"}
    refused = workflowd("start", "hello", "--input", "{}", "--user", "u1", env=env, cwd=tmp_path)
    assert_one_line_error(refused, 1, "invalid input for workflow type 'hello': name: Field required")
    started = workflowd(
        "start", "hello", "--input", '{"name": "Ada"}', "--user", "u1", "--json", env=env, cwd=tmp_path
    )
    assert started.returncode == 0, started.stderr
    assert json.loads(started.stdout)["type"] == "hello"


@pytest.mark.parametrize(
    ("modules", "message"),
    [
        ("./flows.py", "WORKFLOWD_MODULES: no file './flows.py' ("),
        ("my_flows", "WORKFLOWD_MODULES: no module named 'my_flows' on sys.path (PYTHONPATH and"),
    ],
)
def test_a_module_not_found_is_one_clear_line(
    db_url: str, tmp_path: Path, modules: str, message: str
) -> None:
    env = {"DATABASE_URL": db_url, "WORKFLOWD_MODULES": modules}
    result = workflowd("start", "hello", "--user", "u1", env=env, cwd=tmp_path)
    assert_one_line_error(result, 2, message)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["start", "t", "--input", "{not json", "--user", "u"], "not valid JSON"),
        (["start", "t", "--input", "[1, 2]", "--user", "u"], "must be a JSON object"),
        (["start", "t", "--input", "{}"], "--user"),
    ],
)
def test_bad_arguments_are_explained(db_url: str, args: list[str], message: str) -> None:
    result = workflowd(*args, env={"DATABASE_URL": db_url})
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_no_database_configured_is_one_clear_line() -> None:
    assert_one_line_error(workflowd("migrate"), 2, "no database configured: set DATABASE_URL")


def test_an_unreachable_database_is_one_clear_line() -> None:
    url = f"postgresql://someone:s3cret@127.0.0.1:{free_port()}/nowhere"
    result = workflowd("migrate", env={"DATABASE_URL": url})
    assert_one_line_error(result, 2, "cannot reach the database at someone@127.0.0.1:")
    assert "s3cret" not in result.stderr


def test_a_database_without_the_schema_says_to_migrate(empty_db_url: str) -> None:
    result = workflowd("start", "t", "--input", "{}", "--user", "u", env={"DATABASE_URL": empty_db_url})
    assert_one_line_error(result, 2, "run `workflowd migrate` first")


def test_an_invalid_setting_is_one_clear_line(db_url: str) -> None:
    result = workflowd("migrate", env={"DATABASE_URL": db_url, "PORT": "eighty"})
    assert_one_line_error(result, 2, "invalid setting PORT=eighty: Input should be a valid integer")


def test_an_invalid_setting_names_the_variable_the_user_set(db_url: str) -> None:
    result = workflowd("list", env={"DATABASE_URL": db_url, "WORKFLOWD_CONCURRENCY": "abc"})
    assert_one_line_error(
        result, 2, "invalid setting WORKFLOWD_CONCURRENCY=abc: Input should be a valid integer"
    )
    result = workflowd("list", env={"DATABASE_URL": db_url, "WORKFLOWD_SANDBOX_FAILURE_RATE": "2"})
    assert_one_line_error(
        result, 2, "WORKFLOWD_SANDBOX_FAILURE_RATE=2: Input should be less than or equal to 1"
    )


def test_list_takes_a_state_in_any_case_and_names_the_states_for_a_wrong_one(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    insert_workflow(db, type="payout", state="failed")
    listed = workflowd("list", "--state", "FAILED", "--json", env={"DATABASE_URL": db_url})
    assert listed.returncode == 0, listed.stderr
    assert [item["state"] for item in json.loads(listed.stdout)["items"]] == ["failed"]
    wrong = workflowd("list", "--state", "bogus", env={"DATABASE_URL": db_url})
    assert wrong.returncode == 2
    assert "Traceback" not in wrong.stderr
    assert (
        "argument --state: 'bogus' is not a state: one of pending, running, completed, failed, cancelled, "
        "compensating, compensated"
    ) in wrong.stderr


def test_operator_commands_print_tables_and_json(db_url: str, db: psycopg.Connection[Any]) -> None:
    env = {"DATABASE_URL": db_url}
    failed = insert_workflow(db, type="payout", user_id="u-cli", wallet_address="0xcli", state="failed",
                             total_steps=2, current_step_index=1, error={"type": "Boom", "message": "exchange down"})  # fmt: skip
    insert_step(db, failed, 0, "quote", state="completed", attempt=1)
    insert_step(
        db, failed, 1, "pay", state="failed", attempt=3, retry_count=2, error={"message": "exchange down"}
    )
    pending = insert_workflow(db, type="payout", user_id="u-other")
    status = workflowd("status", str(failed["id"]), env=env)
    assert status.returncode == 0, status.stderr
    assert "state            failed" in status.stdout
    assert "progress         1/2 steps (50 %)" in status.stdout
    assert "exchange down" in status.stdout
    assert (
        json.loads(workflowd("status", str(failed["id"]), "--json", env=env).stdout)["summary"]["retries"]
        == 2
    )
    listing = workflowd("list", "--state", "failed", env=env).stdout
    assert str(failed["id"]) in listing
    assert str(pending["id"]) not in listing
    assert "page 1, 1 of 1 workflows" in listing
    assert json.loads(workflowd("list", "--json", "--limit", "1", env=env).stdout)["total"] == 2
    found = workflowd("search", "0xcli", env=env).stdout
    assert str(failed["id"]) in found
    assert "no workflow matches" in workflowd("search", "nobody", env=env).stdout
    stats = workflowd("stats", env=env).stdout
    assert "payout" in stats
    assert "due work no live worker serves (type, or type@version): payout" in stats
    assert json.loads(workflowd("stats", "--json", env=env).stdout)["by_state"] == {"failed": 1, "pending": 1}
    retried = workflowd("retry", str(failed["id"]), env=env)
    assert retried.stdout == f"workflow {failed['id']} is pending\n"
    timeline = workflowd("timeline", str(failed["id"]), env=env).stdout
    assert "failed -> pending" in timeline
    assert (
        json.loads(workflowd("timeline", str(failed["id"]), "--json", env=env).stdout)[0]["to_state"]
        == "pending"
    )
    assert (
        json.loads(workflowd("cancel", str(pending["id"]), "--json", env=env).stdout)["state"] == "cancelled"
    )
    assert (
        workflowd("compensate", str(pending["id"]), env=env).stdout
        == f"workflow {pending['id']} is compensated\n"
    )


def test_list_and_status_count_the_same_steps_and_status_shows_the_output(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    env = {"DATABASE_URL": db_url}
    # A saga whose second step failed, its first step undone, the index walked back to 0.
    undone = insert_workflow(db, type="payout", state="compensated", total_steps=2, current_step_index=0)
    insert_step(db, undone, 0, "quote", state="compensated", attempt=1)
    insert_step(db, undone, 1, "pay", state="failed", attempt=1)
    done = insert_workflow(db, type="payout", state="completed", total_steps=2, current_step_index=2,
                           output={"paid": "1.5", "to": "Ada ✓"})  # fmt: skip
    insert_step(db, done, 0, "quote", state="completed", attempt=1)
    insert_step(db, done, 1, "pay", state="completed", attempt=1)
    listing = workflowd("list", env=env).stdout
    assert re.search(rf"{undone['id']}\s+payout\s+compensated\s+user-1\s+1/2\s", listing), listing
    assert re.search(rf"{done['id']}\s+payout\s+completed\s+user-1\s+2/2\s", listing), listing
    assert "progress         1/2 steps (50 %)" in workflowd("status", str(undone["id"]), env=env).stdout
    status = workflowd("status", str(done["id"]), env=env).stdout
    assert "progress         2/2 steps (100 %)" in status
    assert 'output           {"paid": "1.5", "to": "Ada ✓"}' in status
    assert re.search(
        rf"{done['id']}\s+payout\s+completed\s+user-1\s+2/2\s", workflowd("search", "payout", env=env).stdout
    )


def test_operator_commands_explain_refusals_in_one_line(db_url: str, db: psycopg.Connection[Any]) -> None:
    env = {"DATABASE_URL": db_url}
    done = insert_workflow(db, state="completed")
    assert_one_line_error(
        workflowd("retry", str(done["id"]), env=env), 1, "cannot go from completed to pending"
    )
    assert_one_line_error(
        workflowd("cancel", str(done["id"]), env=env), 1, "cannot go from completed to cancelled"
    )
    assert_one_line_error(
        workflowd("status", "00000000-0000-0000-0000-000000000000", env=env), 1, "no workflow with id"
    )
    assert_one_line_error(workflowd("timeline", "not-an-id", env=env), 1, "is not a workflow id")


def test_start_takes_an_idempotency_key(db_url: str, db: psycopg.Connection[Any]) -> None:
    env = {"DATABASE_URL": db_url}
    start = ("start", "report", "--user", "u1", "--idempotency-key", "report-2026-11", "--allow-unserved")
    first = workflowd(*start, "--input", '{"month": 11, "format": "pdf"}', "--json", env=env)
    assert first.returncode == 0, first.stderr
    document = json.loads(first.stdout)
    assert (document["created"], document["idempotency_key"]) == (True, "report-2026-11")
    again = workflowd(*start, "--input", '{"format": "pdf", "month": 11.0}', env=env)
    assert again.stdout.startswith(f"already started (same idempotency key): workflow {document['id']}")
    assert_one_line_error(
        workflowd(*start, "--input", '{"month": 12, "format": "pdf"}', env=env),
        1,
        "idempotency key 'report-2026-11' already belongs to workflow",
    )
    assert db.execute("SELECT count(*) FROM workflows").fetchone() == (1,)


def test_retry_of_an_outcome_unknown_failure_needs_force(db_url: str, db: psycopg.Connection[Any]) -> None:
    env = {"DATABASE_URL": db_url}
    staged = insert_outcome_unknown_failure(db)
    assert_one_line_error(
        workflowd("retry", str(staged["id"]), env=env), 1, "may have taken effect: check the outside service"
    )
    forced = workflowd("retry", str(staged["id"]), "--force", env=env)
    assert forced.stdout == f"workflow {staged['id']} is pending\n", forced.stderr
    events = json.loads(workflowd("timeline", str(staged["id"]), "--json", env=env).stdout)
    assert [(event["to_state"], event["actor"]) for event in events] == [
        ("pending", f"cli:{getpass.getuser()}"),
        ("pending", f"cli:{getpass.getuser()}"),
    ]
