"""The fault suite's short form, as CI runs it: `python -m tests.chaos --short`.

It starts a PostgreSQL cluster of its own (it restarts the server), so it needs no
database fixture; it takes about a minute and a half on a 2-core machine.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.chaos.suite import SCENARIOS
from tests.daemons import ROOT

SHORT_FORM_LIMIT_SECONDS = 240


@pytest.mark.timeout(SHORT_FORM_LIMIT_SECONDS + 30)
def test_every_scenario_of_the_short_fault_suite_passes() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "tests.chaos", "--short"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SHORT_FORM_LIMIT_SECONDS,
        check=False,
    )
    report = run.stdout + run.stderr
    verdicts = [line for line in run.stdout.splitlines() if line.split(" ", 1)[0] in SCENARIOS]
    assert [line.split(" ", 1)[0] for line in verdicts] == list(SCENARIOS), report
    assert all(line.endswith("PASS") for line in verdicts), report
    assert run.returncode == 0, report
