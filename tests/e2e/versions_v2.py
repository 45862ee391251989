"""Version 2 of the `versioned` type: a step inserted and one renamed. A new daemon loads
it beside version 1 until version 1 has drained (tests.e2e.versions_v1,tests.e2e.versions_v2);
a daemon of the release after that loads it alone."""

from __future__ import annotations

from engine import Step, Workflow
from tests.e2e.flows import recorded

versioned_v2 = Workflow(
    type="versioned",
    version=2,
    max_retries=25,
    steps=[Step("reserve", recorded), Step("check_fraud", recorded), Step("charge_card", recorded)],
)
