"""Every `workflowd` command given a bad value of each of its arguments, and bad settings,
as a user runs it: a real process, with a real database configured (so that an error is
about the bad value, not about a missing database). Each must exit non-zero, print no
traceback, and say in one line what was typed (and, for a setting, its variable).

One line: our own errors are the only line on stderr, `workflowd: ...`; argparse's are its
usage block and then one `workflowd <command>: error: ...` line, which is the line checked.

The commands and their arguments come from the parser, so a new command or a new argument
that takes a value fails `test_every_command_and_argument_has_a_bad_case` until a bad case
is listed for it. A flag takes no value to get wrong, so it needs none.

A NUL cannot be passed in an argument at all (execve refuses it), so the text PostgreSQL
cannot hold that a user can type is bytes of another encoding than UTF-8 (`café` from a
Latin-1 terminal), and the JSON escape \\u0000 in --input.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.cli import build_parser
from engine.service import IDEMPOTENCY_KEY_MAX_LENGTH, LIST_LIMIT_MAX, LIST_PAGE_MAX, SEARCH_QUERY_MAX_LENGTH
from tests.conftest import create_database, drop_database
from tests.integration.test_cli import DB_VARIABLES

# Starting ~50 interpreters is most of the time: run them side by side.
PARALLEL_PROCESSES = 4
PROCESS_TIMEOUT_SECONDS = 30
UNKNOWN_ID = "9b2e6c1e-7d4f-4a8e-9c3b-5f0e1d2a3b4c"
LATIN1 = os.fsdecode("café".encode("latin-1"))  # what Python makes of the bytes c a f \xe9
LATIN1_SHOWN = r"'caf\xe9'"
# Deep enough that json.loads or the engine's canonical form runs out of recursion.
DEEP_JSON = '{"a": ' + "[" * 900 + "]" * 900 + "}"
ARGPARSE_ERROR = re.compile(r"workflowd( [\w-]+)*: error: ")


@dataclass(frozen=True)
class Bad:
    """One bad invocation. `target` is "<command> <what is bad>": an option, a positional's
    metavar, or (with `env`) the setting's variable."""

    target: str
    argv: tuple[str, ...]
    expected: tuple[str, ...]  # each must be in the error line
    env: tuple[tuple[str, str], ...] = ()


def bad(target: str, argv: list[str], *expected: str, **env: str) -> Bad:
    return Bad(target, tuple(argv), expected, tuple(env.items()))


def bad_ids(command: str) -> list[Bad]:
    return [
        bad(f"{command} ID", [command, "not-a-uuid"], "'not-a-uuid' is not a workflow id"),
        bad(f"{command} ID", [command, UNKNOWN_ID], f"no workflow with id {UNKNOWN_ID}"),
    ]


def bad_numbers(option: str, what: str, high: int, *values: str) -> list[Bad]:
    return [
        bad(
            f"list {option}",
            ["list", option, value],
            f"'{value}' is not {what}: a whole number from 1 to {high}",
        )
        for value in values
    ]


START = ["start", "trade_execution", "--user", "u1"]
TOO_LONG_KEY = "k" * (IDEMPOTENCY_KEY_MAX_LENGTH + 1)
TOO_LONG_SEARCH = "q" * (SEARCH_QUERY_MAX_LENGTH + 1)
UNREACHABLE = "postgresql://nobody@127.0.0.1:1/x"

CASES = [
    bad("workflowd COMMAND", ["bogus"], "invalid choice: 'bogus' (choose from 'run'"),
    *(case for command in ("status", "timeline", "retry", "cancel", "compensate") for case in bad_ids(command)),
    bad("list --state", ["list", "--state", "bogus"], "'bogus' is not a state: one of pending, running"),
    *bad_numbers("--page", "a page", LIST_PAGE_MAX, "0", "-1", "abc"),
    *bad_numbers("--limit", "a page size", LIST_LIMIT_MAX, "0", "1000", "abc"),
    bad("list --type", ["list", "--type", LATIN1], f"argument --type: {LATIN1_SHOWN} is not UTF-8 text"),
    bad("list --user", ["list", "--user", LATIN1], f"argument --user: {LATIN1_SHOWN} is not UTF-8 text"),
    bad("start TYPE", ["start", "no_such_type", "--user", "u1"], "workflow type 'no_such_type'"),
    bad("start TYPE", ["start", LATIN1, "--user", "u1"], f"argument TYPE: {LATIN1_SHOWN} is not UTF-8 text"),
    bad("start --input", [*START, "--input", "{not json"], "'{not json' is not valid JSON"),
    bad("start --input", [*START, "--input", "[1, 2]"], "'[1, 2]': the input must be a JSON object"),
    bad("start --input", [*START, "--input", '{"a": NaN}'], """'{"a": NaN}' cannot be stored"""),
    bad("start --input", [*START, "--input", '{"a": "\\u0000"}'], """'{"a": "\\u0000"}' cannot be stored"""),
    bad("start --input", [*START, "--input", DEEP_JSON], """'{"a": [[[""", "nests too deeply"),
    bad("start --input", [*START, "--input", '{"amount": -1}'], "'trade_execution'", "amount: Input should be greater than 0"),
    bad("start --user", ["start", "trade_execution", "--user", LATIN1], f"argument --user: {LATIN1_SHOWN}"),
    bad("start --wallet", [*START, "--wallet", LATIN1], f"argument --wallet: {LATIN1_SHOWN}"),
    bad("start --idempotency-key", [*START, "--idempotency-key", TOO_LONG_KEY], "'kkkk", f"({len(TOO_LONG_KEY)} characters)", f"1 to {IDEMPOTENCY_KEY_MAX_LENGTH} characters"),
    bad("start --idempotency-key", [*START, "--idempotency-key", ""], "'' (0 characters)", f"1 to {IDEMPOTENCY_KEY_MAX_LENGTH} characters"),
    bad("start --at", [*START, "--at", "tomorrow"], "argument --at: 'tomorrow' is not a time with a time zone, such as 2026-12-01T09:00:00+00:00"),
    bad("start --at", [*START, "--at", "2026-12-01T09:00:00"], "'2026-12-01T09:00:00' is not a time with a time zone"),
    bad("start --priority", [*START, "--priority", "1.5"], "argument --priority: a priority is a whole number from -100 (first) to 100 (last), not '1.5'"),
    bad("start --priority", [*START, "--priority", "-101"], "argument --priority: a priority is a whole number from -100 (first) to 100 (last), not -101"),
    bad("start --delay", [*START, "--delay", "-3"], "argument --delay: '-3' is not a number of seconds (0 or more)"),
    bad("start --delay", [*START, "--delay", "1e300"], "a delay is 0 to 3155760000 seconds (a century), not 1e+300"),
    bad("start --delay", [*START, "--delay", "5", "--at", "2026-12-01T09:00:00Z"], "argument --at: not allowed with argument --delay"),
    bad("migrate-version TYPE", ["migrate-version", "no_such_type", "--from", "1", "--to", "2"], "no version 1 of 'no_such_type'"),
    bad("migrate-version TYPE", ["migrate-version", LATIN1, "--from", "1", "--to", "2"], f"argument TYPE: {LATIN1_SHOWN}"),
    bad("migrate-version --from", ["migrate-version", "trade_execution", "--from", "abc", "--to", "2"], "argument --from: invalid int value: 'abc'"),
    bad("migrate-version --to", ["migrate-version", "trade_execution", "--from", "1", "--to", "abc"], "argument --to: invalid int value: 'abc'"),
    bad("migrate-version --to", ["migrate-version", "trade_execution", "--from", "1", "--to", "1"], "from and to are both version 1: nothing would move"),
    bad("search Q", ["search", LATIN1], f"argument Q: {LATIN1_SHOWN} is not UTF-8 text"),
    bad("search Q", ["search", TOO_LONG_SEARCH], "'qqqq", f"({len(TOO_LONG_SEARCH)} characters): a search has 1 to {SEARCH_QUERY_MAX_LENGTH} characters"),
    bad("search Q", ["search", ""], "'' (0 characters)"),
    bad("prune --older-than", ["prune", "--older-than", "-5"], "argument --older-than: '-5' is not a number of seconds (0 or more)"),
    bad("prune --failed-older-than", ["prune", "--failed-older-than", "a week"], "argument --failed-older-than: 'a week' is not a number of seconds"),
    bad("prune WORKFLOWD_RETENTION_DAYS", ["prune"], "WORKFLOWD_RETENTION_DAYS=-1: Input should be greater than or equal to 0", WORKFLOWD_RETENTION_DAYS="-1"),
    bad("set-priority ID", ["set-priority", "not-a-uuid", "5"], "'not-a-uuid' is not a workflow id"),
    bad("set-priority ID", ["set-priority", UNKNOWN_ID, "5"], f"no workflow with id {UNKNOWN_ID}"),
    bad("set-priority N", ["set-priority", UNKNOWN_ID, "urgent"], "argument N: a priority is a whole number from -100 (first) to 100 (last), not 'urgent'"),
    bad("set-priority N", ["set-priority", UNKNOWN_ID, "101"], "argument N: a priority is a whole number from -100 (first) to 100 (last), not 101"),
    bad("send-event ID", ["send-event", "not-a-uuid", "approved"], "'not-a-uuid' is not a workflow id"),
    bad("send-event ID", ["send-event", UNKNOWN_ID, "approved"], f"no workflow with id {UNKNOWN_ID}"),
    bad("send-event NAME", ["send-event", UNKNOWN_ID, LATIN1], f"argument NAME: {LATIN1_SHOWN} is not UTF-8 text"),
    bad("send-event --payload", ["send-event", UNKNOWN_ID, "approved", "--payload", "{bad"], "argument --payload: '{bad' is not valid JSON"),
    bad("send-event --event-id", ["send-event", UNKNOWN_ID, "approved", "--event-id", LATIN1], f"argument --event-id: {LATIN1_SHOWN}"),
    bad("limits ACTION", ["limits", "bogus"], "argument ACTION: invalid choice: 'bogus'"),
    bad("limits set TYPE", ["limits", "set", LATIN1, "--concurrency", "5"], f"argument TYPE: {LATIN1_SHOWN}"),
    bad("limits set --concurrency", ["limits", "set", "t", "--concurrency", "0"], "argument --concurrency: a concurrency limit is a whole number from 1 to 1,000,000, not 0 (or none)"),
    bad("limits set --concurrency", ["limits", "set", "t", "--concurrency", "lots"], "argument --concurrency: a concurrency limit is a whole number from 1 to 1,000,000, not 'lots' (or none)"),
    bad("limits set --rate", ["limits", "set", "t", "--rate", "10"], "argument --rate: a rate limit is a count per period, as 10/s, 600/min or 5/10s, not '10' (or none)"),
    bad("limits set --rate", ["limits", "set", "t", "--rate", "0/s"], "argument --rate: a rate limit allows 1 to 100,000 starts per period, not 0 (or none)"),
    bad("limits set --rate", ["limits", "set", "t"], "name a concurrency limit, a rate limit or both"),
    bad("limits reset TYPE", ["limits", "reset", LATIN1], f"argument TYPE: {LATIN1_SHOWN}"),
    bad("schedule ACTION", ["schedule", "bogus"], "argument ACTION: invalid choice: 'bogus'"),
    bad("schedule add NAME", ["schedule", "add", "no spaces please", "--cron", "0 3 * * *", "--type", "t"], "schedule name 'no spaces please'"),
    bad("schedule add --cron", ["schedule", "add", "n", "--cron", "61 * * * *", "--type", "t"], "cron expression '61 * * * *' is not valid"),
    bad("schedule add --type", ["schedule", "add", "n", "--cron", "0 3 * * *", "--type", "no_such_type"], "no live worker serves workflow type 'no_such_type'"),
    bad("schedule add --input", ["schedule", "add", "n", "--cron", "0 3 * * *", "--type", "reward_grant", "--input", "{}"], "invalid input for workflow type 'reward_grant'"),
    bad("schedule add --user", ["schedule", "add", "n", "--cron", "0 3 * * *", "--type", "t", "--user", LATIN1], f"argument --user: {LATIN1_SHOWN}"),
    bad("schedule add --tz", ["schedule", "add", "n", "--cron", "0 3 * * *", "--type", "t", "--tz", "Mars/Base"], "unknown time zone 'Mars/Base'"),
    bad("schedule add --missed", ["schedule", "add", "n", "--cron", "0 3 * * *", "--type", "t", "--missed", "some"], "argument --missed: invalid choice: 'some'"),
    *(bad(f"schedule {action} NAME", ["schedule", action, "nope"], "no schedule named 'nope'") for action in ("pause", "resume", "remove")),
    bad("schedule list DATABASE_URL", ["schedule", "list"], "cannot reach the database at nobody@127.0.0.1:1/x", DATABASE_URL=UNREACHABLE),
    bad("limits list DATABASE_URL", ["limits", "list"], "cannot reach the database at nobody@127.0.0.1:1/x", DATABASE_URL=UNREACHABLE),
    # Settings: the line names the variable and what it was set to.
    bad("list WORKFLOWD_CONCURRENCY", ["list"], "WORKFLOWD_CONCURRENCY=abc: Input should be a valid integer", WORKFLOWD_CONCURRENCY="abc"),
    bad("run WORKFLOWD_CONCURRENCY", ["run"], "WORKFLOWD_CONCURRENCY=abc", WORKFLOWD_CONCURRENCY="abc"),
    bad("run WORKFLOWD_JWT_JWKS_URL", ["run"], "WORKFLOWD_JWT_JWKS_URL is set but WORKFLOWD_JWT_ISSUER and WORKFLOWD_JWT_AUDIENCE not", WORKFLOWD_JWT_JWKS_URL="https://idp.example/jwks"),
    bad("dev WORKFLOWD_CONCURRENCY", ["dev"], "WORKFLOWD_CONCURRENCY=abc", WORKFLOWD_CONCURRENCY="abc"),
    bad("migrate DATABASE_URL", ["migrate"], "DATABASE_URL=not-a-url: ", DATABASE_URL="not-a-url"),
    bad("run DATABASE_URL", ["run"], "DATABASE_URL=not-a-url: ", DATABASE_URL="not-a-url"),
    bad("dev DATABASE_URL", ["dev"], "DATABASE_URL=not-a-url: ", DATABASE_URL="not-a-url"),
    # Its password is not repeated, though.
    bad("status DATABASE_URL", ["status", UNKNOWN_ID], "DATABASE_URL=postgresql://u:***@127.0.0.1/db?bogus=1", 'invalid URI query parameter: "bogus"', DATABASE_URL="postgresql://u:s3cret@127.0.0.1/db?bogus=1"),
    # Shown as user@host:port/db, the way every message names a database.
    bad("stats DATABASE_URL", ["stats"], "cannot reach the database at nobody@127.0.0.1:1/x (from DATABASE_URL)", DATABASE_URL=UNREACHABLE),
    bad("versions PORT", ["versions"], "PORT=eighty: Input should be a valid integer", PORT="eighty"),
]  # fmt: skip


def case_id(case: Bad) -> str:
    typed = " ".join(case.argv) + "".join(f" [{name}={value}]" for name, value in case.env)
    return typed if len(typed) <= 60 else typed[:59] + "…"


def arguments_of(parser: argparse.ArgumentParser) -> Iterator[str]:
    """The arguments of `parser` that take a value, as a target names them."""
    for action in parser._actions:
        if action.nargs != 0:  # 0: a flag, or --help
            yield action.option_strings[0] if action.option_strings else str(action.metavar or action.dest)


def commands_of(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every command by its words (`status`, `schedule add`), the nested ones too."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[prefix + name] = sub
                found |= commands_of(sub, f"{prefix}{name} ")
    return found


def test_every_command_and_argument_has_a_bad_case() -> None:
    parser = build_parser()
    commands = commands_of(parser)
    arguments = {f"workflowd {name}" for name in arguments_of(parser)}
    arguments |= {f"{command} {name}" for command, sub in commands.items() for name in arguments_of(sub)}
    targets = {case.target for case in CASES}
    assert sorted(arguments - targets) == [], "arguments with no bad case"
    covered = {target.rsplit(" ", 1)[0] for target in targets}
    leaves = {
        command for command in commands if not any(other.startswith(command + " ") for other in commands)
    }
    assert sorted(leaves - covered) == [], "commands with no bad case"
    # And no case names an argument that is gone, or a setting it does not set.
    for case in CASES:
        assert case.target in arguments or case.target.rsplit(" ", 1)[1] in dict(case.env), case


@pytest.fixture(scope="module")
def cli_db_url(pg_server: str, template_db: str) -> Iterator[str]:
    """One migrated database for all the cases: none of them may change it."""
    name = f"wfd_cli_bad_{uuid.uuid4().hex[:12]}"
    url = create_database(pg_server, name, template=template_db)
    try:
        yield url
    finally:
        drop_database(pg_server, name)


def run_case(case: Bad, db_url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {
        name: value
        for name, value in os.environ.items()
        if name not in DB_VARIABLES and name != "PORT" and not name.startswith("WORKFLOWD_")
    }
    argv = [sys.executable, "-m", "daemon", *case.argv]
    try:
        return subprocess.run(
            argv,
            env={**base, "DATABASE_URL": db_url, **dict(case.env)},
            # `dev` keeps its files in the current folder: not the work tree's.
            cwd=cwd,
            capture_output=True,
            text=True,
            errors="backslashreplace",
            timeout=PROCESS_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, 0, "", f"still running after {PROCESS_TIMEOUT_SECONDS} s")


@pytest.fixture(scope="module")
def outcomes(
    cli_db_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Mapping[Bad, subprocess.CompletedProcess[str]]:
    """Every case's process, run once, side by side."""
    cwd = tmp_path_factory.mktemp("cli_bad_arguments")
    with ThreadPoolExecutor(PARALLEL_PROCESSES) as pool:
        results = pool.map(lambda case: run_case(case, cli_db_url, cwd), CASES)
        return dict(zip(CASES, results, strict=True))


def the_error_line(stderr: str) -> str:
    """Our own error alone on stderr, or argparse's after its usage block (and nothing else)."""
    *before, line = stderr.rstrip("\n").split("\n")
    if ARGPARSE_ERROR.match(line):
        assert before, stderr
        assert before[0].startswith("usage: "), stderr
        assert all(wrapped.startswith(" ") for wrapped in before[1:]), stderr
    else:
        assert line.startswith("workflowd: "), stderr
        assert before == [], stderr
    return line


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_a_bad_value_is_refused_in_one_line_that_names_it(
    case: Bad, outcomes: Mapping[Bad, subprocess.CompletedProcess[str]]
) -> None:
    result = outcomes[case]
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert result.returncode != 0, result
    line = the_error_line(result.stderr)
    for fragment in case.expected:
        assert fragment in line
