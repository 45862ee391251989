"""The seed's examples (examples/) and the README's starting snippets run as written,
against a real daemon, and give the fields the seed reads."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from decimal import Decimal
from typing import Any

import psycopg

from tests.e2e.conftest import ROOT, Daemons, wait_until


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


def readme_snippets(language: str) -> list[str]:
    """The README's code blocks in `language` under "Starting workflows"."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Starting workflows", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, re.DOTALL)


def test_the_readmes_sql_start_completes_with_a_trade_hash(
    daemons: Daemons, db: psycopg.Connection[Any]
) -> None:
    (insert,) = readme_snippets("sql")
    daemons.start()
    db.execute(insert)
    wait_until(
        lambda: db.execute("SELECT state FROM workflows").fetchone() == ("completed",), 30, "the trade"
    )
    (output,) = db.execute("SELECT output FROM workflows").fetchone()  # type: ignore[misc]
    assert re.fullmatch(r"0x[0-9a-f]{64}", output["tradeHash"])


def test_the_readmes_python_start_prints_the_trade_hash(
    daemons: Daemons, db_url: str, db: psycopg.Connection[Any]
) -> None:
    (snippet,) = readme_snippets("python")[:1]
    program = snippet.replace('"postgresql://postgres@127.0.0.1/postgres"', "os.environ['DATABASE_URL']")
    # Top-level awaits, as in a notebook or `python -m asyncio`: run them in a coroutine.
    wrapped = (
        "import asyncio, os\n\nasync def main():\n"
        + textwrap.indent(program, "    ")
        + "\nasyncio.run(main())\n"
    )
    daemons.start()
    result = subprocess.run(
        [sys.executable, "-c", wrapped], env={**os.environ, "DATABASE_URL": db_url, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (output,) = db.execute("SELECT output FROM workflows").fetchone()  # type: ignore[misc]
    assert result.stdout.splitlines()[-1] == output["tradeHash"]
