"""The seed's examples (examples/) run as written, against a real daemon, and give the
fields the seed reads. (The README's blocks: test_readme.py.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from decimal import Decimal
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
    progress = [line for line in output.splitlines() if "%" in line]
    assert progress[-1] == "completed: 100 % (done)"
    assert not any(line.startswith("pending") for line in progress), output  # only once it runs
    assert len(set(progress)) == len(progress), output  # each change once
    assert "verified True" in output
    workflow_id = output.split()[2].rstrip(";")
    (shaped,) = db.execute("SELECT output FROM workflows WHERE id = %s", (workflow_id,)).fetchone()  # type: ignore[misc]
    assert re.fullmatch(r"0x[0-9a-f]{40}", shaped["contractAddress"])
    assert re.fullmatch(r"0x[0-9a-f]{64}", shaped["transactionHash"])
    assert f"transaction hash {shaped['transactionHash']}" in output


def test_the_trade_example_completes_with_the_seeds_fraction_slippage_and_trade_hash(
    daemons: Daemons, db_url: str, db: psycopg.Connection[Any]
) -> None:
    daemons.start()
    output = run_example("execute_trade.py", db_url)
    assert " is completed\n" in output
    (fill,) = db.execute("SELECT output FROM workflows WHERE type = 'trade_execution'").fetchone()  # type: ignore[misc]
    assert re.fullmatch(r"0x[0-9a-f]{64}", fill["tradeHash"])
    assert fill["amountIn"] == "1.5"
    assert Decimal(fill["amountOut"]) == Decimal("1.5") * Decimal(fill["price"])  # the sandbox's fill, exact
    assert f"trade hash {fill['tradeHash']}: 1.5 ETH for {fill['amountOut']} USDC" in output
