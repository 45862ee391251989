"""A smoke run of the benchmark suite, so that its code keeps working; the figures
themselves are measured by `make bench`, never by tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_bench_command_runs_every_case_of_our_own_and_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    # Enough workflows for the daemons' CPU to register: /proc counts it in 10 ms ticks.
    command = [
        sys.executable, "-m", "bench", "--workflows", "300", "--processes", "1", "--repeats", "1",
        "--inserts", "5", "--finished", "2000", "--due", "50", "--pruned", "2000", "--stats-rows", "5000", "--no-peers", "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    for key in (
        "sql_limit", "workflowd_1_step_1_processes", "workflowd_3_step_1_processes",
        "pickup_p50_ms", "pickup_p99_ms", "workflowd_1_step_plain_2_processes", "burst_stale_statistics",
        "burst_analyzed", "large_tables", "workflowd_1_step_noop_limited_2_processes",
        "workflowd_1_step_noop_fair_2_processes", "workflowd_1_step_noop_1_2_processes",
    ):  # fmt: skip
        assert figures[key]["median"] > 0, key
        assert len(figures[key]["runs"]) == 1
    drain = figures["workflowd_3_step_1_processes"]["runs"][0]
    assert drain["server_cpu_ms_per_workflow"] > 0
    assert drain["wal_bytes_per_workflow"] > 0
    assert drain["daemon_cpu_ms_per_workflow"] > 0
    assert drain["daemon_connections_max"] >= 1
    assert "what a drain cost" in result.stdout
    assert figures["claim_cost"]["finished_rows"] == 2000
    assert figures["memory"]["peak_rss_mb"] > 0
    assert "workflowd 3-step workflows, 1 process(es)" in result.stdout
    assert "burst after idle, stale statistics ÷ analyzed" in result.stdout
    assert figures["prune"]["finished"] == 2000
    assert figures["prune"]["pruned_per_s"] > 0
    assert figures["prune"]["pruning_pickups"] >= 2
    assert figures["stats"]["rows"] == 5000
    assert figures["stats"]["stats_ms"] > 0
    assert "pickup latency of single inserts, 2 daemons, pruning" in result.stdout
    assert set(figures["flow_claims"]["ms"]) == {"noop_1", "noop_limited", "noop_rated", "noop_fair"}
    assert all(ms > 0 for ms in figures["flow_claims"]["ms"].values())
    assert "1-step steps/s, noop_fair, 2 processes" in result.stdout
    for case in ("off", "on"):
        assert figures[f"workflowd_1_step_tracing_{case}_2_processes"]["median"] > 0
    assert figures["tracing"]["spans_received_share"] == 1  # every span of 300 workflows arrived
    assert "traced ÷ not" in result.stdout
    assert figures["relay"]["events"] >= 300 * 2  # each workflow's claim and completion at least
    assert figures["relay"]["events_per_s"] > 0
    assert figures["relay"]["without_relay_steps_per_s"] > 0
    assert figures["relay_steady"]["events"] == 4 * 1000  # 100 a second for 10 s, 4 events each
    assert 0 < figures["relay_steady"]["delay_p50_ms"] <= figures["relay_steady"]["delay_p99_ms"]
