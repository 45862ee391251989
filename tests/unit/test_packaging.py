"""The systemd unit and the Dockerfile say what operators rely on."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.settings import SHUTDOWN_GRACE_SECONDS_DEFAULT

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "workflowd@.service"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def test_the_unit_is_a_hardened_notify_template_that_outlasts_the_grace_period() -> None:
    service = unit()["Service"]
    assert service["Type"] == "notify"
    assert int(service["WatchdogSec"]) > 0
    assert int(service["TimeoutStopSec"]) > SHUTDOWN_GRACE_SECONDS_DEFAULT
    assert service["Restart"] == "on-failure"
    # A long database outage never leaves the unit failed for good.
    assert unit()["Unit"]["StartLimitIntervalSec"] == "0"
    assert service["ExecStart"].endswith("workflowd run")
    assert "%i" in UNIT.read_text()  # one environment file per instance
    for setting in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert service[setting] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["User"] == "workflowd"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    workflowd = Path(sys.executable).with_name("workflowd")
    text = UNIT.read_text().replace("/opt/workflowd/.venv/bin/workflowd", str(workflowd))
    (tmp_path / "workflowd@.service").write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(tmp_path / "workflowd@.service")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_the_image_runs_unprivileged_with_a_python_healthcheck() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.count("FROM ") == 2  # multi-stage
    assert "USER 10001:10001" in dockerfile
    assert 'ENTRYPOINT ["workflowd", "run"]' in dockerfile
    assert "HEALTHCHECK" in dockerfile
    assert "/healthz" in dockerfile
    assert "curl" not in dockerfile.split("HEALTHCHECK", 1)[1].split("\n")[1]
