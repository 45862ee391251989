"""The e2e harness's reading of daemon logs: which lines fail a test at teardown."""

from __future__ import annotations

import json
from pathlib import Path

from tests.daemons import crash_lines, read_log_events


def line(event: str, level: str = "info") -> str:
    return json.dumps({"event": event, "level": level})


def test_crashed_events_and_critical_lines_are_found_unless_expected(tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    log.write_text(
        "\n".join(
            [
                line("worker_started"),
                line("claim_crashed", "error"),
                line("side_task_crashed", "critical"),
                line("pool_exhausted", "critical"),
                "Traceback (most recent call last):",
                line("workflow_completed"),
            ]
        )
    )
    events = read_log_events(log)
    assert [event["event"] for event in crash_lines(events)] == [
        "claim_crashed",
        "side_task_crashed",
        "pool_exhausted",
    ]
    assert [event["event"] for event in crash_lines(events, expected=["claim_crashed"])] == [
        "side_task_crashed",
        "pool_exhausted",
    ]


def test_a_line_cut_off_by_kill_9_is_skipped(tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    log.write_text(line("claim_crashed", "error") + '\n{"event": "workflow_comp')
    assert [event["event"] for event in read_log_events(log)] == ["claim_crashed"]
