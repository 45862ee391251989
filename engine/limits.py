"""Flow control's rules: what a concurrency limit and a rate limit may be, and the limits
that hold for a type (`workflow_type_limits`), as a daemon reads them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

# A limit of N is N rows of workflow_slots: a million is more than any fleet runs at once.
CONCURRENCY_LIMIT_MAX = 1_000_000
# A rate of N is N rows of workflow_rate_tokens, and a claim may walk past the ones a
# lowered rate no longer uses: a hundred thousand starts per period is plenty.
RATE_LIMIT_MAX = 100_000
# A period from a second (what a claim loop polling every few tenths of a second can
# keep to) to a day. (Migration 0018 holds the database to these bounds too, for rows
# written by hand: tests/integration/test_limits.py proves them the same.)
RATE_PERIOD_MIN_SECONDS, RATE_PERIOD_MAX_SECONDS = 1.0, 86_400.0
RATE_UNITS = {
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hour": 3600, "hours": 3600,
    "d": 86_400, "day": 86_400, "days": 86_400,
}  # fmt: skip
# "10/s", "600/min", "5/10s", "1000 / 1 hour": a count, then a period, in one unit.
_RATE = re.compile(r"\s*(\d{1,9})\s*/\s*(\d{1,6}(?:\.\d{1,3})?)?\s*([a-z]+)\s*", re.IGNORECASE)


def concurrency_problem(limit: object) -> str | None:
    """Why `limit` is not a concurrency limit (a whole number from 1 to a million, or
    None for none), in words; None when it is."""
    if limit is None or (
        isinstance(limit, int) and not isinstance(limit, bool) and 1 <= limit <= CONCURRENCY_LIMIT_MAX
    ):
        return None
    return f"a concurrency limit is a whole number from 1 to {CONCURRENCY_LIMIT_MAX:,}, not {limit!r}"


@dataclass(frozen=True)
class RateLimit:
    """At most `count` step starts in any stretch of `period_seconds`, across the fleet."""

    count: int
    period_seconds: float

    @classmethod
    def parse(cls, text: object) -> RateLimit:
        """`10/s`, `600/min`, `5/10s`, `1000/h`, `20000/day`; ValueError (one line
        saying what a rate is) otherwise."""
        match = _RATE.fullmatch(text) if isinstance(text, str) else None
        unit = RATE_UNITS.get(match.group(3).lower()) if match else None
        if match is None or unit is None:
            raise ValueError(f"a rate limit is a count per period, as 10/s, 600/min or 5/10s, not {text!r}")
        rate = cls(int(match.group(1)), float(match.group(2) or 1) * unit)
        if problem := rate.problem():
            raise ValueError(problem)
        return rate

    def problem(self) -> str | None:
        """Why this is not a rate the engine keeps to, in words; None when it is."""
        if not 1 <= self.count <= RATE_LIMIT_MAX:
            return f"a rate limit allows 1 to {RATE_LIMIT_MAX:,} starts per period, not {self.count}"
        if not RATE_PERIOD_MIN_SECONDS <= self.period_seconds <= RATE_PERIOD_MAX_SECONDS:
            return f"a rate limit's period is from 1 second to 1 day, not {self.period_seconds:g} s"
        return None

    def __str__(self) -> str:
        for name, seconds in (("day", 86_400), ("h", 3600), ("min", 60), ("s", 1)):
            if self.period_seconds == seconds:
                return f"{self.count}/{name}"
        return f"{self.count}/{self.period_seconds:g}s"


def rate_limit_problem(text: object) -> str | None:
    """Why `text` is not a rate limit (or None for none), in words; None when it is."""
    if text is None:
        return None
    try:
        RateLimit.parse(text)
    except ValueError as error:
        return str(error)
    return None


# What a fair type's due work is shared by (Workflow(fair_by=...)): its workflows' user.
FAIR_BY = ("user_id",)


def fair_by_problem(fair_by: object) -> str | None:
    """Why `fair_by` is not what a type's work may be shared by, in words; None when it is."""
    if fair_by is None or fair_by in FAIR_BY:
        return None
    return f"fair_by names what work is shared by: {', '.join(FAIR_BY)}, not {fair_by!r}"


@dataclass(frozen=True)
class TypeLimits:
    """The limits that hold for one type (a row of workflow_type_limits), and what its
    work is shared by between users (None: it is claimed in priority and due order)."""

    max_concurrency: int | None = None
    rate: RateLimit | None = None
    fair_by: str | None = None


def concurrency_limited(limits: Mapping[str, TypeLimits]) -> list[str]:
    """The types of `limits` with a concurrency limit (slots to take), sorted."""
    return sorted(name for name, each in limits.items() if each.max_concurrency is not None)


def rate_limited(limits: Mapping[str, TypeLimits]) -> list[str]:
    """The types of `limits` with a rate (tokens to spend), sorted."""
    return sorted(name for name, each in limits.items() if each.rate is not None)


class Unchanged(Enum):
    """A limit an operator's command leaves as it holds (`set_limit`'s default)."""

    UNCHANGED = "unchanged"


UNCHANGED = Unchanged.UNCHANGED
