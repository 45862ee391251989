"""The fault suite: `python -m tests.chaos [--short] [--only NAME ...] [--seed N]` (`make chaos`).

Starts a PostgreSQL cluster of its own (it restarts it), runs each scenario against real
`workflowd run` processes on a fresh database, and prints one line per scenario with its
invariants and PASS or FAIL, the reasons and observations indented below it. Exits 1 if
any scenario fails. The logs of a failed run are kept, and their folder printed.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from tests.chaos import faults, hostile
from tests.chaos.harness import CHAOS_SETTINGS, ChaosPostgres
from tests.chaos.stage import Stage, Verdict

SCENARIOS: dict[str, Callable[[Stage], Verdict]] = {
    "kill-9-storm": faults.kill_storm,
    "sigstop-past-lease": faults.sigstop_past_the_lease,
    "postgres-restarts": faults.postgres_restarts,
    "terminate-backends": faults.terminate_backends,
    "proxy-cut-and-stall": faults.proxy_cuts_and_stalls,
    "bad-rows": hostile.bad_rows,
    "os-exit-step": hostile.exiting_step,
    "admin-abuse": hostile.admin_abuse,
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--short", action="store_true", help="the CI form: fewer workflows, faults and seconds"
    )
    parser.add_argument("--only", action="append", choices=sorted(SCENARIOS), help="run only this scenario")
    parser.add_argument("--seed", type=int, default=7, help="seed of the faults' randomness (default 7)")
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the daemons' logs of a passing run too"
    )
    return parser.parse_args(argv)


def run_scenario(name: str, cluster: ChaosPostgres, logs: Path, short: bool, seed: int) -> Verdict:
    log_dir = logs / name
    log_dir.mkdir()
    db_url = cluster.scenario_database(f"chaos_{name.replace('-', '_')}")
    stage = Stage(name, cluster, db_url, log_dir, short, random.Random(f"{seed}:{name}"))
    started = time.monotonic()
    try:
        verdict = SCENARIOS[name](stage)
    except Exception as error:
        # A scenario that could not finish is a failure to report, not a reason to skip the rest.
        trace = traceback.format_exception(error)[-1].strip()
        verdict = Verdict(name, None, problems=[f"the scenario broke off: {trace}"])
    verdict.seconds = time.monotonic() - started
    return verdict


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    names = args.only or list(SCENARIOS)
    logs = Path(tempfile.mkdtemp(prefix="workflowd-chaos-"))
    started = time.monotonic()
    verdicts = []
    print(f"fault suite, {'short' if args.short else 'full'} form, seed {args.seed}", flush=True)
    with ChaosPostgres.temporary(CHAOS_SETTINGS) as cluster:
        cluster.prepare_template()
        for name in names:
            verdict = run_scenario(name, cluster, logs, args.short, args.seed)
            verdicts.append(verdict)
            print("\n".join([verdict.line(), *verdict.details()]), flush=True)
    failed = [verdict.name for verdict in verdicts if not verdict.passed]
    print(
        f"{len(verdicts) - len(failed)} of {len(verdicts)} scenarios passed "
        f"in {time.monotonic() - started:.0f} s"
    )
    if failed or args.keep_logs:
        print(f"{'failed: ' + ', '.join(failed) + '; ' if failed else ''}daemon logs in {logs}")
    else:
        shutil.rmtree(logs, ignore_errors=True)
    return 1 if failed else 0
