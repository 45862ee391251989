"""The claim of limited and fair types (flow control, sql/queries/limits.sql): in the
claiming transaction, lock the slots and rate tokens that may be taken, lock a fair
type's due work round-robin across its users, grant them to due workflows, claim those,
move each slot to its workflow's lease and spend a token for each step started. And
the rekey that keeps each unfinished workflow's fair_key what its type's rule says
(migration 0019), run by every daemon (daemon/periodic.py)."""

from __future__ import annotations

from collections.abc import Mapping
from uuid import UUID

from engine.attempts import ClaimedWorkflow
from engine.limits import TypeLimits, concurrency_limited, rate_limited
from engine.store import Row, StepDefinitions, Store

# How many workflows one transaction of a rekey gives their new key.
REKEY_BATCH = 10_000
# How often each daemon looks for rekey requests: a type's rows inserted before its
# limit was set are claimed from the first rekey on (after the limit's own refresh).
REKEY_INTERVAL_SECONDS = 2.0


async def claim_limited(
    tx: Store,
    *,
    limits: Mapping[str, TypeLimits],
    worker_id: str,
    served: list[str],
    busy: list[UUID],
    room: int,
    lease_seconds: float,
    definitions: StepDefinitions,
) -> list[ClaimedWorkflow]:
    """Claim up to `room` due workflows of the `limits` types, each within its limits,
    a fair type's round-robin across its users. `served`: the served keys of those
    types; `busy` as for claim_due_workflows. Types with no due work are left out first:
    a claim locks no slot or token of a type with nothing to start."""
    due = set(await tx.due_flow_controlled_types(list(limits)))
    limits = {name: each for name, each in limits.items() if name in due}
    slotted, tokened = concurrency_limited(limits), rate_limited(limits)
    slots = await tx.lock_slots(types=slotted, wanted=room) if slotted else []
    tokens = await tx.lock_tokens(types=tokened, wanted=room) if tokened else []
    caps = _caps(limits, slots, tokens, room)
    if not caps:
        return []
    fair_caps = {name: cap for name, cap in caps.items() if limits[name].fair_by is not None}
    fair = await tx.lock_fair_workflows(caps=fair_caps, served=served, busy=busy) if fair_caps else []
    granted = await tx.grant_workflows(
        caps=caps, slots=slots, fair_types=list(fair_caps), fair=fair, served=served, busy=busy, limit=room
    )
    if not granted:
        return []
    rows = await tx.claim_granted_workflows(
        worker_id=worker_id, granted=granted, lease_seconds=lease_seconds, definitions=definitions
    )
    if taken := [row for row in granted if row["slot"] is not None]:
        await tx.take_slots(taken)
    if spent := _tokens_for(rows, tokens):
        await tx.spend_tokens(spent)
    return rows


def _caps(limits: Mapping[str, TypeLimits], slots: list[Row], tokens: list[Row], room: int) -> dict[str, int]:
    """How many workflows of each limited type a claim may start: the least of its locked
    slots, its locked tokens and the claim's room; types with none left out."""
    caps = {}
    for name, each in limits.items():
        cap = room
        if each.max_concurrency is not None:
            cap = min(cap, sum(1 for slot in slots if slot["type"] == name))
        if each.rate is not None:
            cap = min(cap, sum(1 for token in tokens if token["type"] == name))
        if cap > 0:
            caps[name] = cap
    return caps


def _tokens_for(claimed: list[ClaimedWorkflow], tokens: list[Row]) -> list[Row]:
    """A locked token of its type for each claimed workflow of a rate-limited type
    (grant_workflows granted no more of a type than it has tokens)."""
    unspent: dict[str, list[Row]] = {}
    for token in tokens:
        unspent.setdefault(token["type"], []).append(token)
    return [unspent[row.type].pop() for row in claimed if unspent.get(row.type)]


async def rekey(store: Store) -> int:
    """Work the requests for new flow keys (migration 0019) until none can be worked on
    now; how many workflows got a new key. Each pass gives the type's unfinished rows
    their key, a batch a transaction; the first pass at once, the last once every
    transaction running when the first began has ended (a writer that read the old rule
    then has committed); the request goes when the last pass leaves no row behind."""
    rekeyed = 0
    while True:
        async with store.transaction() as tx:
            request = await tx.next_flow_rekey()
            if request is None:
                return rekeyed
            type_ = request["type"]
            if request["new"]:
                await tx.begin_flow_rekey(type_)
            count = await tx.rekey_workflows(type=type_, batch=REKEY_BATCH)
            rekeyed += count
            if count == REKEY_BATCH:
                continue
            if not request["last_pass"]:
                await tx.end_first_rekey_pass(type_)
            elif not await tx.finish_flow_rekey(type_):
                return rekeyed  # a row was locked: the next round
