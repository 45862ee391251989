"""engine.schedules: ticks in a time zone (across DST changes), missed-tick policies,
the tick's key, and one clear line for a bad name, expression or zone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from engine.schedules import Schedule, ScheduleError, due_ticks, next_tick, previous_tick, tick_key

EVERY_TWO_SECONDS = "* * * * * */2"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_ticks_are_read_in_the_schedules_zone_and_given_in_utc() -> None:
    # 02:30 in Paris: 01:30 UTC in winter, 00:30 UTC in summer.
    assert next_tick("30 2 * * *", "Europe/Paris", T0) == datetime(2026, 1, 1, 1, 30, tzinfo=UTC)
    summer = datetime(2026, 7, 1, tzinfo=UTC)
    assert next_tick("30 2 * * *", "Europe/Paris", summer) == datetime(2026, 7, 1, 0, 30, tzinfo=UTC)


def test_a_wall_clock_time_the_spring_change_skips_fires_once_right_after_it() -> None:
    # 2026-03-29 02:00 Paris time does not exist (clocks jump to 03:00 = 01:00 UTC).
    night = datetime(2026, 3, 28, 23, 0, tzinfo=UTC)
    first = next_tick("30 2 * * *", "Europe/Paris", night)
    assert first == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
    assert next_tick("30 2 * * *", "Europe/Paris", first) == datetime(2026, 3, 30, 0, 30, tzinfo=UTC)


def test_missed_ticks_are_all_in_order_or_only_the_newest() -> None:
    now = T0 + timedelta(seconds=9)
    every = due_ticks(EVERY_TWO_SECONDS, "UTC", T0 + timedelta(seconds=2), now, "all")
    assert every == [T0 + timedelta(seconds=s) for s in (2, 4, 6, 8)]
    assert due_ticks(EVERY_TWO_SECONDS, "UTC", T0 + timedelta(seconds=2), now, "latest") == [
        T0 + timedelta(seconds=8)
    ]
    assert due_ticks(EVERY_TWO_SECONDS, "UTC", now + timedelta(seconds=1), now, "all") == []
    # A year of every-second ticks missed: `latest` is one step, not a walk through them.
    year_later = T0 + timedelta(days=365)
    assert due_ticks("* * * * * *", "UTC", T0, year_later, "latest") == [year_later]


def test_the_newest_tick_at_or_before_now() -> None:
    assert previous_tick(EVERY_TWO_SECONDS, "UTC", T0 + timedelta(seconds=10)) == T0 + timedelta(seconds=10)
    assert previous_tick(EVERY_TWO_SECONDS, "UTC", T0 + timedelta(seconds=11)) == T0 + timedelta(seconds=10)


def test_a_ticks_key_names_the_schedule_and_the_utc_instant() -> None:
    paris = datetime(2026, 1, 1, 2, 30, tzinfo=UTC).astimezone()
    assert tick_key("nightly", paris) == "schedule:nightly:2026-01-01T02:30:00Z"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "has space"}, "schedule name 'has space'"),
        ({"cron": "* * *"}, "cron expression '* * *' is not valid: five fields"),
        ({"cron": "61 * * * *"}, "cron expression '61 * * * *' is not valid"),
        ({"timezone": "Mars/Base"}, "unknown time zone 'Mars/Base'"),
        ({"missed": "some"}, "missed ticks 'some': one of latest, all"),
    ],
)
def test_a_bad_schedule_is_one_line_naming_what_is_wrong(fields: dict[str, str], message: str) -> None:
    with pytest.raises(ScheduleError, match="^" + message.replace("*", r"\*").replace("(", r"\(")):
        Schedule(**({"name": "n", "cron": "0 3 * * *", "type": "t"} | fields))  # type: ignore[arg-type]
