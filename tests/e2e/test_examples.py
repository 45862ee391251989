"""The README's Python examples run as written, against a real daemon."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import psycopg

from tests.e2e.conftest import ROOT, Daemons


def run_example(name: str, db_url: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        env={**os.environ, "DATABASE_URL": db_url, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_deployment_example_watches_progress_to_100(
    daemons: Daemons, db_url: str, db: psycopg.Connection[Any]
) -> None:
    daemons.start(sandbox_latency_ms=100)
    output = run_example("deploy_contract.py", db_url)
    assert output.startswith("started workflow ")
    assert "completed: 100 % (done)" in output
    assert "verified True" in output


def test_the_trade_example_waits_for_completion(daemons: Daemons, db_url: str) -> None:
    daemons.start()
    output = run_example("execute_trade.py", db_url)
    assert " is completed: {'booked': {'ETH': -1.5, 'USDC': " in output
