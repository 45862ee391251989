"""Cron schedules: a workflow started at every tick of a cron expression.

A `Schedule` names a cron expression (five fields, or six with seconds last, as croniter
reads them), its time zone, and the workflow each tick starts. Declared at the top level
of a module in WORKFLOWD_MODULES it is upserted when a daemon starts; `workflowd
schedule` and /admin/schedules manage schedules at run time. This module is pure: what
the ticks are, and the key each tick's workflow gets; the store fires them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter  # type: ignore[import-untyped]

from engine.errors import WorkflowEngineError

# A schedule whose daemons were all down for a while fires its newest missed tick once
# (`latest`), or every missed tick in order (`all`, at most MISSED_TICKS_MAX a pass).
MissedTicks = Literal["latest", "all"]
MISSED_TICKS = ("latest", "all")
MISSED_TICKS_MAX = 1_000
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$")


class ScheduleError(WorkflowEngineError, ValueError):
    """A schedule that cannot be: a bad name, cron expression or time zone."""


class ScheduleNotFoundError(WorkflowEngineError):
    """No schedule has the given name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no schedule named {name!r}")


@dataclass(frozen=True)
class Schedule:
    """Start a workflow of `type` with `input` (and `user_id`) at every tick of `cron`,
    read in `timezone`."""

    name: str
    cron: str
    type: str
    input: Mapping[str, Any] = field(default_factory=dict)
    user_id: str | None = None
    timezone: str = "UTC"
    missed: MissedTicks = "latest"

    def __post_init__(self) -> None:
        check_schedule(self.name, self.cron, self.timezone, self.missed)


def check_schedule(name: str, cron: str, timezone: str, missed: str) -> None:
    """Raise ScheduleError, in one line naming what is wrong, unless all four are valid."""
    if not NAME_PATTERN.fullmatch(name):
        raise ScheduleError(
            f"schedule name {name!r}: 1 to 200 letters, digits and _ . : -, starting with a letter or digit"
        )
    zone(timezone)
    if len(cron.split()) not in (5, 6) or not croniter.is_valid(cron):
        raise ScheduleError(
            f"cron expression {cron!r} is not valid: five fields (minute hour day month weekday, "
            "e.g. '0 3 * * *'), or six with seconds last"
        )
    if missed not in MISSED_TICKS:
        raise ScheduleError(f"missed ticks {missed!r}: one of {', '.join(MISSED_TICKS)}")


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(
            f"unknown time zone {name!r} (an IANA name such as UTC or Europe/Paris)"
        ) from None


def next_tick(cron: str, timezone: str, after: datetime) -> datetime:
    """The first tick strictly after `after`, in UTC. Ticks are read in the schedule's
    time zone (a wall-clock time the spring change skips fires at the first moment
    after it; one the autumn change repeats fires once)."""
    tick: datetime = _ticks(cron, timezone, after).get_next(datetime)
    return tick.astimezone(UTC)


def previous_tick(cron: str, timezone: str, now: datetime) -> datetime:
    """The newest tick at or before `now`, in UTC."""
    before: datetime = _ticks(cron, timezone, now).get_prev(datetime)  # strictly before `now`
    at = next_tick(cron, timezone, before)
    return at if at <= now else before.astimezone(UTC)


def _ticks(cron: str, timezone: str, start: datetime) -> Any:
    try:
        return croniter(cron, start.astimezone(zone(timezone)))
    except CroniterError as error:
        raise ScheduleError(f"cron expression {cron!r}: {error}") from None


def due_ticks(
    cron: str, timezone: str, first: datetime, now: datetime, missed: MissedTicks
) -> list[datetime]:
    """The ticks to fire now, oldest first, from `first` (the schedule's next tick) up to
    `now`: all of them (at most MISSED_TICKS_MAX a pass; the rest on the next), or only
    the newest."""
    if first > now:
        return []
    if missed == "latest":
        return [max(first, previous_tick(cron, timezone, now))]
    ticks: list[datetime] = []
    tick = first
    while tick <= now and len(ticks) < MISSED_TICKS_MAX:
        ticks.append(tick)
        tick = next_tick(cron, timezone, tick)
    return ticks


def tick_key(name: str, tick: datetime) -> str:
    """The idempotency key of the workflow a tick starts: schedule:{name}:{tick in UTC,
    RFC 3339}. Whatever fires the tick, however often, it starts one workflow."""
    return f"schedule:{name}:{tick.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}"
