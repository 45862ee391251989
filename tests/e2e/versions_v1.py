"""Version 1 of the `versioned` type, as the release before a deploy defines it: what an
old daemon loads (WORKFLOWD_MODULES=tests.e2e.versions_v1)."""

from __future__ import annotations

from engine import Step, Workflow
from tests.e2e.flows import recorded

versioned_v1 = Workflow(
    type="versioned", version=1, max_retries=25, steps=[Step("reserve", recorded), Step("charge", recorded)]
)
