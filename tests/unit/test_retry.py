"""The retry policy: exponential backoff, capped, spread by jitter; and who gets a retry."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.retry import (
    BASE_DELAY_SECONDS_DEFAULT,
    DEFAULT_RETRY_POLICY,
    JITTER_RATIO_DEFAULT,
    MAX_DELAY_SECONDS_DEFAULT,
    RetryPolicy,
    next_retry_time,
    should_retry,
)
from engine.states import StepState

seeds = st.integers(min_value=0, max_value=2**32 - 1)
retry_counts = st.integers(min_value=0, max_value=200)


@st.composite
def policies(draw: st.DrawFn, max_jitter: float = 0.99) -> RetryPolicy:
    base = draw(st.floats(min_value=0.001, max_value=100.0))
    cap = draw(st.floats(min_value=base, max_value=100_000.0))
    jitter = draw(st.floats(min_value=0.0, max_value=max_jitter))
    return RetryPolicy(base_delay_seconds=base, max_delay_seconds=cap, jitter_ratio=jitter)


def test_defaults_are_one_second_doubling_to_thirty() -> None:
    assert DEFAULT_RETRY_POLICY == RetryPolicy(
        BASE_DELAY_SECONDS_DEFAULT, MAX_DELAY_SECONDS_DEFAULT, JITTER_RATIO_DEFAULT
    )
    delays = [DEFAULT_RETRY_POLICY.undithered_delay(n) for n in range(7)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_without_jitter_the_delay_is_the_undithered_one() -> None:
    policy = RetryPolicy(base_delay_seconds=0.5, max_delay_seconds=10.0, jitter_ratio=0.0)
    assert [policy.delay(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0]


def test_a_huge_retry_count_is_capped_without_overflow() -> None:
    assert DEFAULT_RETRY_POLICY.undithered_delay(10**9) == MAX_DELAY_SECONDS_DEFAULT
    assert RetryPolicy(max_delay_seconds=1e300).undithered_delay(10**6) == 2.0**64


def test_a_negative_retry_count_is_refused() -> None:
    with pytest.raises(ValueError, match="retry_count cannot be negative"):
        DEFAULT_RETRY_POLICY.delay(-1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base_delay_seconds": -0.1}, "cannot be negative"),
        ({"max_delay_seconds": -1.0}, "cannot be negative"),
        ({"jitter_ratio": -0.01}, r"\[0, 1\)"),
        ({"jitter_ratio": 1.0}, r"\[0, 1\)"),
    ],
)
def test_an_invalid_policy_is_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kwargs)


def test_the_same_rng_seed_gives_the_same_delay() -> None:
    first = DEFAULT_RETRY_POLICY.delay(3, random.Random(42))
    assert first == DEFAULT_RETRY_POLICY.delay(3, random.Random(42))
    assert 8.0 * 0.9 <= first <= 8.0 * 1.1


def test_jitter_spreads_delays_of_the_same_retry() -> None:
    delays = {DEFAULT_RETRY_POLICY.delay(2, random.Random(seed)) for seed in range(50)}
    assert len(delays) > 40
    assert min(delays) >= 4.0 * 0.9
    assert max(delays) <= 4.0 * 1.1


@st.composite
def growth_cases(draw: st.DrawFn) -> tuple[RetryPolicy, int]:
    """A policy with jitter under 1/3, and a retry count whose next delay is not yet capped."""
    base = draw(st.floats(min_value=0.001, max_value=100.0))
    doublings = draw(st.integers(min_value=1, max_value=30))
    cap = base * 2.0**doublings * draw(st.floats(min_value=1.0, max_value=2.0))
    jitter = draw(st.floats(min_value=0.0, max_value=0.33))
    n = draw(st.integers(min_value=0, max_value=doublings - 1))
    return RetryPolicy(base_delay_seconds=base, max_delay_seconds=cap, jitter_ratio=jitter), n


@settings(max_examples=200)
@given(case=growth_cases(), seed_a=seeds, seed_b=seeds)
def test_delays_grow_strictly_while_under_the_cap(
    case: tuple[RetryPolicy, int], seed_a: int, seed_b: int
) -> None:
    policy, n = case
    assert policy.undithered_delay(n + 1) == 2 * policy.undithered_delay(n)
    this = policy.delay(n, random.Random(seed_a))
    following = policy.delay(n + 1, random.Random(seed_b))
    assert this < following


@settings(max_examples=200)
@given(policy=policies(), n=retry_counts, seed=seeds)
def test_delay_is_never_negative_nor_beyond_the_jittered_cap(policy: RetryPolicy, n: int, seed: int) -> None:
    delay = policy.delay(n, random.Random(seed))
    assert 0.0 <= delay <= policy.max_delay_seconds * (1.0 + policy.jitter_ratio)


@given(policy=policies(), n=retry_counts, seed=seeds)
def test_delay_stays_within_jitter_of_the_undithered_delay(policy: RetryPolicy, n: int, seed: int) -> None:
    raw = policy.undithered_delay(n)
    delay = policy.delay(n, random.Random(seed))
    assert raw * (1.0 - policy.jitter_ratio) <= delay <= raw * (1.0 + policy.jitter_ratio)


@given(policy=policies(), n=retry_counts)
def test_undithered_delay_is_monotonic_and_capped(policy: RetryPolicy, n: int) -> None:
    assert policy.undithered_delay(n) <= policy.undithered_delay(n + 1)
    assert policy.undithered_delay(n) <= policy.max_delay_seconds


def test_zero_base_delay_retries_at_once() -> None:
    policy = RetryPolicy(base_delay_seconds=0.0)
    assert [policy.delay(n, random.Random(n)) for n in range(5)] == [0.0] * 5


def test_next_retry_time_adds_the_delay_to_now() -> None:
    now = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
    assert next_retry_time(3, 2.0, now=now, jitter=0.0) == now + timedelta(seconds=16)
    assert next_retry_time(10, 2.0, now=now, jitter=0.0) == now + timedelta(seconds=30)
    assert next_retry_time(10, 2.0, now=now, max_delay=100.0, jitter=0.0) == now + timedelta(seconds=100)


def test_next_retry_time_uses_the_rng_for_jitter() -> None:
    now = datetime(2024, 1, 1, tzinfo=UTC)
    expected = DEFAULT_RETRY_POLICY.delay(2, random.Random(7))
    assert next_retry_time(2, now=now, rng=random.Random(7)) == now + timedelta(seconds=expected)


def test_next_retry_time_defaults_to_the_current_utc_time() -> None:
    before = datetime.now(UTC)
    due = next_retry_time(0, 1.0, jitter=0.0)
    after = datetime.now(UTC)
    assert due.tzinfo is not None
    assert before + timedelta(seconds=1) <= due <= after + timedelta(seconds=1)


def test_next_retry_time_refuses_an_invalid_policy() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        next_retry_time(0, jitter=1.5)


@given(
    state=st.sampled_from(StepState),
    as_text=st.booleans(),
    retry_count=st.integers(0, 20),
    max_retries=st.integers(0, 20),
)
def test_should_retry_only_a_failed_step_with_retries_left(
    state: StepState, as_text: bool, retry_count: int, max_retries: int
) -> None:
    argument = state.value if as_text else state
    expected = state is StepState.FAILED and retry_count < max_retries
    assert should_retry(argument, retry_count, max_retries) is expected


def test_should_retry_examples() -> None:
    assert should_retry(StepState.FAILED, 0, 3)
    assert should_retry("failed", 2, 3)
    assert not should_retry(StepState.FAILED, 3, 3)
    assert not should_retry(StepState.FAILED, 0, 0)
    assert not should_retry(StepState.RUNNING, 0, 3)


def test_should_retry_refuses_an_unknown_state() -> None:
    with pytest.raises(ValueError, match="exploded"):
        should_retry("exploded", 0, 3)
