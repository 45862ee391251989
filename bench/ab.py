"""An A/B of drains between two checkouts of this repository, on one cluster, in turn:
`python -m bench.ab before=PATH,after=PATH [--rounds 8] [--steps 1,3]`.

Each side is a checkout with its own virtualenv (`make install` in it: the editable
install points at its own tree, so a shared one would run one side's code twice). Each
round runs `bench.daemon.throughput` (20,000 workflows, 2 daemons) with each side's
code, the order alternating from round to round, on one cluster this script starts:
the two sides meet the same server, in the same hour of a machine whose speed drifts.
Prints each run, then the medians; what the README's A/B figures come from.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path
from typing import Any

from daemon.local_postgres import LocalPostgres

FIGURES = (
    "steps_per_s",
    "wal_bytes_per_workflow",
    "server_cpu_ms_per_workflow",
    "daemon_cpu_ms_per_workflow",
)
# Run by each side's interpreter, in its own tree: that side's bench and daemons.
RUN = """
import json
from pathlib import Path
from bench.daemon import throughput
from daemon.local_postgres import LocalPostgres
cluster = LocalPostgres(Path({data!r}), port={port})
print(json.dumps(throughput(cluster, 2, {workflows}, 100, steps={steps})))
"""


def run_side(path: Path, cluster: LocalPostgres, workflows: int, steps: int) -> dict[str, Any]:
    code = RUN.format(data=str(cluster.data_dir), port=cluster.port, workflows=workflows, steps=steps)
    out = subprocess.run(
        [str(path / ".venv" / "bin" / "python"), "-c", code],
        cwd=path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    figures: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    parser.add_argument("sides", help="NAME=PATH,NAME=PATH: the checkouts to compare")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", default="1,3", help="steps per workflow, comma-separated")
    parser.add_argument("--workflows", type=int, default=20_000)
    args = parser.parse_args()
    sides = {name: Path(path) for name, path in (side.split("=", 1) for side in args.sides.split(","))}
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    with LocalPostgres.temporary() as cluster:
        for round_ in range(args.rounds):
            order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
            for steps in (int(count) for count in args.steps.split(",")):
                for name in order:
                    figures = run_side(sides[name], cluster, args.workflows, steps)
                    runs.setdefault((name, steps), []).append(figures)
                    print(round_, name, f"{steps}-step", *(figures[key] for key in FIGURES), flush=True)
    for (name, steps), figures in sorted(runs.items(), key=lambda item: (item[0][1], item[0][0])):
        medians = {key: statistics.median(float(each[key]) for each in figures) for key in FIGURES}
        print(f"{name}, {steps}-step, medians of {len(figures)}: {medians}")


if __name__ == "__main__":
    main()
