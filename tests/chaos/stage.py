"""A scenario's world (its database, daemons, scale and randomness) and its verdict: the
shared invariants plus what the scenario itself promised, one line each."""

from __future__ import annotations

import contextlib
import random
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.chaos.harness import ChaosPostgres, Database, Fleet
from tests.daemons import crash_events
from tests.invariants import Invariants, check_invariants

DAEMON_DEFAULTS = {
    "builtins": "false",  # the suite's own types only: a faster start
    "log_level": "info",
    "concurrency": 10,
    "lease_seconds": 2,
    "poll_interval": 0.2,
    "shutdown_grace": 2,
}


@dataclass
class Verdict:
    """What one scenario found. It passes when the shared invariants hold, no daemon logged
    a crash, and the scenario's own expectations (`problems`) were all met."""

    name: str
    invariants: Invariants | None
    crashes: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.invariants is not None and self.invariants.ok and not self.crashes and not self.problems

    def line(self) -> str:
        found = self.invariants.summary() if self.invariants else "no invariants: the scenario broke off"
        outcome = "PASS" if self.passed else "FAIL"
        return f"{self.name:<20} {found}  crashes {len(self.crashes)}  {self.seconds:5.1f} s  {outcome}"

    def details(self) -> list[str]:
        """Indented lines under the verdict: why it failed, then what it observed."""
        reasons = [*(self.invariants.problems if self.invariants else []), *self.problems]
        # The same crash repeats at every retry of the claim: each kind once, with its count.
        kinds = Counter(f"logged {event.get('event')}: {_brief(event)}" for event in self.crashes)
        reasons += [f"{kind} ({count}x)" for kind, count in kinds.most_common(3)]
        return [f"    FAIL: {reason}" for reason in reasons] + [f"    note: {note}" for note in self.notes]


def _brief(event: Mapping[str, Any]) -> str:
    text = str(event.get("exception") or event.get("error") or "")
    return text.strip().splitlines()[-1][:300] if text.strip() else "(no detail)"


@dataclass
class Stage:
    """One scenario's database, log folder, scale (short or full) and seeded randomness."""

    name: str
    cluster: ChaosPostgres
    db_url: str
    log_dir: Path
    short: bool
    rng: random.Random

    @property
    def db(self) -> Database:
        return Database(self.db_url)

    def size(self, short: int | float, full: int | float) -> Any:
        """The short form's figure or the full form's."""
        return short if self.short else full

    @contextlib.contextmanager
    def fleet(
        self, count: int, env_extra: Mapping[str, str] | None = None, **settings: Any
    ) -> Iterator[Fleet]:
        """`count` started daemons, stopped at the end of the block. Steps record their
        effects straight into the database, whatever route the daemon itself takes."""
        env = {"TEST_EFFECTS_URL": self.db_url, **(env_extra or {})}
        fleet = Fleet(self.db_url, self.log_dir, count, {**DAEMON_DEFAULTS, **settings}, env)
        try:
            yield fleet.start()
        finally:
            fleet.stop()

    def judge(
        self,
        fleet: Fleet,
        expected_completed: int,
        problems: list[str] | None = None,
        notes: list[str] | None = None,
    ) -> Verdict:
        """The verdict, read while the fleet still runs (its daemons must be alive)."""
        with self.db.connection() as conn:
            invariants = check_invariants(
                conn,
                expected_completed=expected_completed,
                daemons=[daemon.process for daemon in fleet.slots],
            )
        return Verdict(self.name, invariants, crash_events(fleet.started), problems or [], notes or [])
