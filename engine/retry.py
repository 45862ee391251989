"""The retry policy: exponential backoff with a cap and jitter.

The daemon stores the resulting time in `next_retry_at`; the database's clock adds the
delay (`now() + delay`), so only the delay is computed here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from engine.states import StepState

BASE_DELAY_SECONDS_DEFAULT = 1.0
MAX_DELAY_SECONDS_DEFAULT = 30.0
JITTER_RATIO_DEFAULT = 0.10


@dataclass(frozen=True)
class RetryPolicy:
    """Delay before retry n (0-based) is base * 2**n, capped, then spread by ±jitter.

    Jitter keeps many workflows that failed together (an outside service went down)
    from retrying in lockstep. With a jitter ratio under 1/3 the delays still grow
    strictly until the cap.
    """

    base_delay_seconds: float = BASE_DELAY_SECONDS_DEFAULT
    max_delay_seconds: float = MAX_DELAY_SECONDS_DEFAULT
    jitter_ratio: float = JITTER_RATIO_DEFAULT

    def __post_init__(self) -> None:
        if self.base_delay_seconds < 0 or self.max_delay_seconds < 0:
            raise ValueError("retry delays cannot be negative")
        if not 0 <= self.jitter_ratio < 1:
            raise ValueError("the jitter ratio must be in [0, 1)")

    def undithered_delay(self, retry_count: int) -> float:
        """The delay before jitter: exponential in `retry_count`, at most the cap."""
        if retry_count < 0:
            raise ValueError("retry_count cannot be negative")
        # Past 2**64 the float would overflow long before any real retry count.
        exponent = min(retry_count, 64)
        return float(min(self.max_delay_seconds, self.base_delay_seconds * 2.0**exponent))

    def delay(self, retry_count: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number `retry_count` (0 for the first retry)."""
        raw = self.undithered_delay(retry_count)
        spread = (rng or random).uniform(-self.jitter_ratio, self.jitter_ratio)
        return max(0.0, raw * (1.0 + spread))


DEFAULT_RETRY_POLICY = RetryPolicy()


def next_retry_time(
    retry_count: int,
    base_delay: float = BASE_DELAY_SECONDS_DEFAULT,
    *,
    now: datetime | None = None,
    max_delay: float = MAX_DELAY_SECONDS_DEFAULT,
    jitter: float = JITTER_RATIO_DEFAULT,
    rng: random.Random | None = None,
) -> datetime:
    """When retry number `retry_count` is due, counted from `now` (the seed's helper)."""
    policy = RetryPolicy(base_delay, max_delay, jitter)
    start = now if now is not None else datetime.now(UTC)
    return start + timedelta(seconds=policy.delay(retry_count, rng))


def should_retry(state: StepState | str, retry_count: int, max_retries: int) -> bool:
    """Whether a failed step has retries left: it failed, and fewer than max_retries ran."""
    return StepState(state) is StepState.FAILED and retry_count < max_retries
