"""Abusive HTTP clients of a daemon's port, and a prober of its health endpoints.

Raw sockets, not an HTTP client library: the abuse is in what a library would never
send (a body of 50 MB announced and trickled, headers one byte at a time). Everything
here is bounded: a client gives up after its time, and the whole attack ends by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

OVERSIZED_BYTES = 50 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024
# A health probe slower than this, or not 200, counts as the daemon not answering.
PROBE_LIMIT_SECONDS = 2.0
PROBE_INTERVAL_SECONDS = 0.1
# Refusing a request must not mean holding its body: a daemon's peak memory may grow by
# this much at most during the attack.
RSS_GROWTH_LIMIT_MB = 30
REFUSALS = (401, 413)
CLIENT_TIMEOUT_SECONDS = 20.0


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


@dataclass
class Oversized:
    """How a daemon answered the 50 MB unauthenticated POST."""

    status: int | None
    body_bytes_sent: int
    seconds: float

    @property
    def refused(self) -> bool:
        # An answer of 401 or 413; or the connection closed on us before we could send
        # half the body, which is a refusal that did not read it either.
        return self.status in REFUSALS or (
            self.status is None and self.body_bytes_sent < OVERSIZED_BYTES // 2
        )


@dataclass
class AttackReport:
    probes: list[tuple[int | None, float]] = field(default_factory=list)
    oversized: list[Oversized] = field(default_factory=list)
    slow_clients: int = 0

    def problems(self) -> list[str]:
        found = []
        unanswered = [(status, seconds) for status, seconds in self.probes if status != 200]
        slow = [seconds for status, seconds in self.probes if status == 200 and seconds > PROBE_LIMIT_SECONDS]
        if not self.probes:
            found.append("no health probe was made")
        if unanswered:
            found.append(f"{len(unanswered)} of {len(self.probes)} health probes failed: {unanswered[:3]}")
        if slow:
            found.append(
                f"{len(slow)} health probes took over {PROBE_LIMIT_SECONDS} s (slowest {max(slow):.1f} s)"
            )
        for answer in self.oversized:
            if not answer.refused:
                found.append(
                    f"the 50 MB unauthenticated POST got {answer.status} "
                    f"after {answer.body_bytes_sent >> 20} MB "
                    f"(expected {' or '.join(map(str, REFUSALS))}, or a refusal before half the body)"
                )
        return found

    def notes(self) -> list[str]:
        answered = sorted(seconds for status, seconds in self.probes if status == 200)
        slowest = f"slowest {answered[-1] * 1000:.0f} ms" if answered else "none answered"
        oversized = "; ".join(
            f"{answer.status} after {answer.body_bytes_sent >> 20} MB in {answer.seconds:.1f} s"
            for answer in self.oversized
        )
        return [
            f"{len(self.probes)} health probes, {slowest}; {self.slow_clients} slow clients",
            f"50 MB unauthenticated POST answered: {oversized}",
        ]


async def attack(ports: list[int], seconds: float, slow_clients: int) -> AttackReport:
    """Slow clients and an oversized POST against every port, health probes throughout."""
    report = AttackReport(slow_clients=slow_clients)
    until = time.monotonic() + seconds
    prober = asyncio.create_task(probe(ports, until, report))
    trickles = [
        asyncio.create_task(slow_client(ports[n % len(ports)], headers_only=n % 2 == 0, until=until))
        for n in range(slow_clients)
    ]
    await asyncio.sleep(0.5)  # the slow clients hold their connections first
    report.oversized = list(await asyncio.gather(*(oversized_post(port) for port in ports)))
    await asyncio.gather(prober, *trickles)
    return report


async def probe(ports: list[int], until: float, report: AttackReport) -> None:
    """GET /livez and /readyz of every daemon, every 0.1 s, until `until`."""
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_SECONDS) as client:
        while time.monotonic() < until:
            for port in ports:
                for path in ("/livez", "/readyz"):
                    started = time.monotonic()
                    try:
                        status: int | None = (await client.get(f"http://127.0.0.1:{port}{path}")).status_code
                    except httpx.HTTPError:
                        status = None
                    report.probes.append((status, time.monotonic() - started))
            await asyncio.sleep(PROBE_INTERVAL_SECONDS)


async def slow_client(port: int, headers_only: bool, until: float) -> None:
    """An unauthenticated POST sent one byte every half second until `until`: its headers
    (slowloris), or its body after complete headers."""
    with contextlib.suppress(TimeoutError, OSError):
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), CLIENT_TIMEOUT_SECONDS
        )
        try:
            head = "POST /admin/workflows HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            head += (
                "X-Slow: "
                if headers_only
                else "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
            )
            writer.write(head.encode())
            while time.monotonic() < until and not reader.at_eof():
                writer.write(b"a")
                await asyncio.wait_for(writer.drain(), CLIENT_TIMEOUT_SECONDS)
                await asyncio.sleep(0.5)
        finally:
            writer.transport.abort()


def oversized_body() -> list[bytes]:
    """A valid JSON start request of exactly OVERSIZED_BYTES, in chunks."""
    prefix, suffix = b'{"type": "chaos_steps", "user_id": "x", "input": {"pad": "', b'"}}'
    padding = OVERSIZED_BYTES - len(prefix) - len(suffix)
    chunks = [prefix]
    while padding > 0:
        chunks.append(b"x" * min(CHUNK_BYTES, padding))
        padding -= len(chunks[-1])
    return [*chunks, suffix]


async def oversized_post(port: int) -> Oversized:
    """POST 50 MB without a token, stopping as soon as the daemon answers or hangs up."""
    started = time.monotonic()
    sent = 0
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = asyncio.create_task(reader.read(4096))
    try:
        writer.write(
            f"POST /admin/workflows HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {OVERSIZED_BYTES}\r\n\r\n".encode()
        )
        for chunk in oversized_body():
            if answer.done():
                break
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), CLIENT_TIMEOUT_SECONDS)
            sent += len(chunk)
        response = await asyncio.wait_for(answer, CLIENT_TIMEOUT_SECONDS)
    except (TimeoutError, OSError):
        response = answer.result() if answer.done() and not answer.exception() else b""
    finally:
        answer.cancel()
        writer.transport.abort()
    return Oversized(status_of(response), sent, time.monotonic() - started)


def status_of(response: bytes) -> int | None:
    """The status code of an HTTP/1.1 response's first line, if any arrived."""
    parts = response.split(b" ", 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return None
