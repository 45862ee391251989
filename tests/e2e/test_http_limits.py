"""What no client can do to a running daemon's HTTP server: make it read a body before
the token is checked, make it hold a body over the cap, starve the health probes by
holding connections or flooding them, or reach the admin API with a guessable token."""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from daemon.local_postgres import free_port
from tests.e2e.conftest import Daemon, Daemons, wait_until
from tests.integration.test_cli import assert_one_line_error, workflowd

TOKEN = "test-token-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MIB = 1024 * 1024
PROBES = ("/livez", "/readyz", "/healthz", "/metrics")


@pytest.fixture
def daemon(daemons: Daemons) -> Daemon:
    return daemons.start(admin_token=TOKEN)


def rss_bytes(pid: int) -> int:
    """The resident memory of a process, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


@contextmanager
def raw_connection(daemon: Daemon, head: list[str]) -> Iterator[socket.socket]:
    """A connection that has sent a request head (and nothing of its body yet)."""
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    try:
        sock.sendall(("\r\n".join([*head, "Host: 127.0.0.1", "", ""])).encode())
        yield sock
    finally:
        sock.close()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one HTTP/1.1 response."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(status_line.split()[1]), headers, body


def stream(sock: socket.socket, total: int, chunked: bool = False) -> int:
    """Send up to `total` bytes of body; returns how many went out before the peer closed
    the connection (or stopped taking them)."""
    piece = b"x" * (256 * 1024)
    sent = 0
    try:
        while sent < total:
            data = piece[: total - sent]
            sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n" if chunked else data)
            sent += len(data)
        if chunked:
            sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass
    return sent


def test_an_unauthenticated_50_mb_post_is_refused_unread(daemon: Daemon) -> None:
    size = 50 * MIB
    # Warm up the paths a refusal takes, so that what follows measures the body alone.
    for _ in range(3):
        assert httpx.post(f"{daemon.url}/admin/workflows", content=b"{}").status_code == 401
    before = rss_bytes(daemon.pid)
    head = ["POST /admin/workflows HTTP/1.1", "Content-Type: application/json", f"Content-Length: {size}"]
    with raw_connection(daemon, head) as sock:
        sent = stream(sock, size)
        status, headers, body = read_response(sock)
    assert status == 401
    assert headers["www-authenticate"] == "Bearer"
    assert headers["connection"] == "close"
    assert b"Bearer" in body
    # The daemon closed the connection instead of reading on: most of the body never left.
    assert sent < size / 2, sent
    assert rss_bytes(daemon.pid) - before < 10 * MIB
    assert httpx.get(f"{daemon.url}/livez").status_code == 200


def test_an_authenticated_body_over_the_cap_is_refused_with_413_on_its_length(daemon: Daemon) -> None:
    head = ["POST /admin/workflows HTTP/1.1", f"Authorization: Bearer {TOKEN}",
            "Content-Type: application/json", f"Content-Length: {MIB + 1}"]  # fmt: skip
    with raw_connection(daemon, head) as sock:
        status, headers, body = read_response(sock)  # answered on the head: no body was sent
    assert (status, headers["connection"]) == (413, "close")
    assert b"larger than 1048576 bytes (WORKFLOWD_MAX_BODY_BYTES)" in body
    # A body of exactly the cap is read.
    start = b'{"type": "nobody_serves_this", "allow_unserved": true, "user_id": "u", "input": {"pad": "'
    end = b'"}}'
    exactly = start + b"x" * (MIB - len(start) - len(end)) + end
    assert len(exactly) == MIB
    json_auth = AUTH | {"Content-Type": "application/json"}
    answer = httpx.post(f"{daemon.url}/admin/workflows", content=exactly, headers=json_auth, timeout=10)
    assert answer.status_code == 201


def test_a_chunked_body_over_the_cap_is_refused_with_413_as_it_streams(daemon: Daemon) -> None:
    head = ["POST /admin/workflows HTTP/1.1", f"Authorization: Bearer {TOKEN}",
            "Content-Type: application/json", "Transfer-Encoding: chunked"]  # fmt: skip
    with raw_connection(daemon, head) as sock:
        sent = stream(sock, 8 * MIB, chunked=True)
        status, headers, body = read_response(sock)
    assert (status, headers["connection"]) == (413, "close")
    assert b"WORKFLOWD_MAX_BODY_BYTES" in body
    assert sent < 8 * MIB, sent
    # A chunked body under the cap is read as usual.
    small = iter(
        [b'{"type": "nobody_serves_this", "allow_unserved": true, ', b'"user_id": "u", "input": {"n": 1}}']
    )
    answer = httpx.post(
        f"{daemon.url}/admin/workflows", content=small, headers=AUTH | {"Content-Type": "application/json"}
    )
    assert answer.status_code == 201


@contextmanager
def slow_clients(daemon: Daemon, count: int, *, inside_bodies: bool = True) -> Iterator[None]:
    """`count` connections that never finish their request: half stop inside the head,
    half (unless not `inside_bodies`) inside an authenticated body."""
    held = []
    try:
        for n in range(count):
            sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
            held.append(sock)
            if n % 2 or not inside_bodies:
                sock.sendall(b"GET /admin/workflows HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            else:
                sock.sendall(
                    f"POST /admin/workflows HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                    'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"type": '.encode()
                )
        yield
    finally:
        for sock in held:
            sock.close()


def test_health_answers_while_200_slow_clients_hold_connections(daemon: Daemon) -> None:
    with slow_clients(daemon, 200), httpx.Client(base_url=daemon.url, timeout=5) as client:
        for path in PROBES:
            started = time.monotonic()
            assert client.get(path).status_code == 200, path
            assert time.monotonic() - started < 2, path
        assert client.get("/admin/workflows", headers=AUTH).status_code == 200


def test_connections_beyond_the_cap_are_answered_503(daemons: Daemons) -> None:
    daemon = daemons.start(admin_token=TOKEN, http_max_connections=10)
    # Heads that never end: a request with a whole head beyond the cap is answered 503 and
    # its connection closed, which would make room.
    with slow_clients(daemon, 10, inside_bodies=False):
        assert httpx.get(f"{daemon.url}/livez", timeout=5).status_code == 503
    wait_until(lambda: httpx.get(f"{daemon.url}/livez", timeout=5).status_code == 200, 5, "room again")


def run_env(db_url: str, **settings: str) -> dict[str, str]:
    """The environment of a `workflowd run` that is expected to refuse to start."""
    env = {"DATABASE_URL": db_url, "WORKFLOWD_MODULES": "tests.e2e.flows", "PORT": str(free_port())}
    return env | {f"WORKFLOWD_{name.upper()}": value for name, value in settings.items()}


def test_a_short_admin_token_refuses_to_start_in_one_line(db_url: str) -> None:
    result = workflowd("run", env=run_env(db_url, admin_token="x" * 31))
    assert_one_line_error(
        result, 2, "the admin token of WORKFLOWD_ADMIN_TOKEN has 31 characters, fewer than 32"
    )


def test_the_admin_token_can_come_from_a_file(daemons: Daemons, db_url: str, tmp_path: Path) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n")  # as `echo` writes it: the newline is not part of it
    daemon = daemons.start({"WORKFLOWD_ADMIN_TOKEN_FILE": str(token_file)})
    assert httpx.get(f"{daemon.url}/admin/workflows", headers=AUTH).status_code == 200
    assert (
        httpx.get(f"{daemon.url}/admin/workflows", headers={"Authorization": "Bearer x"}).status_code == 401
    )
    both = workflowd("run", env=run_env(db_url, admin_token=TOKEN, admin_token_file=str(token_file)))
    assert_one_line_error(both, 2, "both WORKFLOWD_ADMIN_TOKEN and WORKFLOWD_ADMIN_TOKEN_FILE are set")
    missing = workflowd("run", env=run_env(db_url, admin_token_file=str(tmp_path / "missing")))
    assert_one_line_error(missing, 2, "cannot read WORKFLOWD_ADMIN_TOKEN_FILE")
    (tmp_path / "short").write_text("too-short\n")
    short = workflowd("run", env=run_env(db_url, admin_token_file=str(tmp_path / "short")))
    assert_one_line_error(short, 2, "has 9 characters, fewer than 32")


def backends(db: psycopg.Connection[Any], application_name: str) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT pid, wait_event_type, query_start FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = %s",
        (application_name,),
    ).fetchall()


def test_readiness_answers_on_its_own_connection_while_the_admin_pool_is_exhausted(
    daemon: Daemon, db_url: str, db: psycopg.Connection[Any]
) -> None:
    with psycopg.connect(db_url) as locker, ThreadPoolExecutor(6) as pool:
        locker.execute("LOCK TABLE workflows IN ACCESS EXCLUSIVE MODE")  # held until the rollback
        stuck = [
            pool.submit(httpx.get, f"{daemon.url}/admin/workflows", headers=AUTH, timeout=30)
            for _ in range(6)
        ]
        wait_until(
            lambda: [row[1] for row in backends(db, "workflowd-api")].count("Lock") == 4,
            10,
            "the admin API's four connections to wait on the lock",
        )
        for _ in range(5):
            started = time.monotonic()
            assert httpx.get(f"{daemon.url}/readyz", timeout=5).json()["status"] == "ready"
            assert time.monotonic() - started < 1.5
        assert len(backends(db, "workflowd-health")) == 1
        locker.rollback()
        assert [future.result().status_code for future in stuck] == [200] * 6


def test_readiness_asks_the_database_at_most_once_a_second(
    daemon: Daemon, db: psycopg.Connection[Any]
) -> None:
    assert httpx.get(f"{daemon.url}/readyz").status_code == 200  # opens the probe's connection
    done = threading.Event()
    answers: list[int] = []

    def flood() -> None:
        with httpx.Client(base_url=daemon.url, timeout=5) as client:
            while not done.is_set():
                answers.append(client.get("/readyz").status_code)

    query_starts = set()
    with ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(flood)
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            query_starts.update(row[2] for row in backends(db, "workflowd-health"))
            time.sleep(0.02)
        done.set()
    assert len(answers) > 50, len(answers)
    assert set(answers) == {200}
    starts = sorted(query_starts)
    gaps = [(later - earlier).total_seconds() for earlier, later in itertools.pairwise(starts)]
    assert len(starts) >= 3, starts  # it did ask during the flood, every second or so
    assert min(gaps) >= 0.95, gaps


def test_a_head_that_never_ends_is_closed_after_the_head_timeout_however_often_it_trickles(
    daemons: Daemons,
) -> None:
    daemon = daemons.start(admin_token=TOKEN, http_head_timeout=1)
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        sock.settimeout(0.3)
        closed = False
        while not closed and time.monotonic() - started < 8:
            try:
                closed = sock.recv(1024) == b""
            except TimeoutError:
                with contextlib.suppress(OSError):
                    sock.sendall(b"X")  # a byte now and then does not push the deadline back
            except OSError:
                closed = True
        assert closed
        assert 0.9 <= time.monotonic() - started < 3


def test_slow_heads_beyond_the_cap_give_the_probes_back_after_the_head_timeout(daemons: Daemons) -> None:
    daemon = daemons.start(admin_token=TOKEN, http_max_connections=10, http_head_timeout=1)
    with slow_clients(daemon, 10, inside_bodies=False):
        assert httpx.get(f"{daemon.url}/livez", timeout=5).status_code == 503
        # Still held open by the clients, the slow heads are closed by the server.
        wait_until(lambda: httpx.get(f"{daemon.url}/livez", timeout=5).status_code == 200, 5, "room again")
