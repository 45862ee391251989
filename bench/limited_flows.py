"""Flow-controlled no-op types for bench/flow.py, served only by the daemons of its
cases: a concurrency limit no drain reaches, a rate, fairness."""

from __future__ import annotations

from bench.flows import noop
from engine import Step, Workflow

noop_limited = Workflow(type="noop_limited", max_concurrency=1_000, steps=[Step("only", noop)])
noop_rated = Workflow(type="noop_rated", rate_limit="10000/s", steps=[Step("only", noop)])
noop_fair = Workflow(type="noop_fair", fair_by="user_id", steps=[Step("only", noop)])
