"""The workflow and step state machines: which arrows exist, and how the rest are refused."""

from __future__ import annotations

import re
from collections import deque
from enum import StrEnum

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.errors import IllegalTransitionError
from engine.sqlfiles import sql_dir
from engine.states import (
    RUNNABLE_WORKFLOW_STATES,
    STEP_TRANSITIONS,
    WORKFLOW_TRANSITIONS,
    StepState,
    TransitionTable,
    WorkflowState,
)

W = WorkflowState
S = StepState

# The arrows of the seed's diagrams: the tables may add arrows, never drop these.
SEED_WORKFLOW_ARROWS = [
    (W.PENDING, W.RUNNING),
    (W.RUNNING, W.COMPLETED),
    (W.RUNNING, W.FAILED),
    (W.FAILED, W.COMPENSATING),
    (W.COMPENSATING, W.COMPENSATED),
    (W.PENDING, W.CANCELLED),
    (W.RUNNING, W.CANCELLED),
]
SEED_STEP_ARROWS = [
    (S.PENDING, S.RUNNING),
    (S.RUNNING, S.COMPLETED),
    (S.RUNNING, S.FAILED),
    (S.COMPLETED, S.COMPENSATING),
    (S.COMPENSATING, S.COMPENSATED),
    (S.PENDING, S.SKIPPED),
]

MACHINES = [
    pytest.param(WORKFLOW_TRANSITIONS, WorkflowState, WORKFLOW_TRANSITIONS.check, id="workflow"),
    pytest.param(STEP_TRANSITIONS, StepState, STEP_TRANSITIONS.check, id="step"),
]


def _reachable(table: TransitionTable[StrEnum], start: StrEnum) -> set[StrEnum]:
    seen = {start}
    queue = deque([start])
    while queue:
        for target in table.allowed(queue.popleft()):
            if target not in seen:
                seen.add(target)
                queue.append(target)
    return seen


@pytest.mark.parametrize(("source", "target"), SEED_WORKFLOW_ARROWS)
def test_seed_workflow_arrows_exist(source: WorkflowState, target: WorkflowState) -> None:
    assert WORKFLOW_TRANSITIONS.can(source, target)
    WORKFLOW_TRANSITIONS.check(source, target)


@pytest.mark.parametrize(("source", "target"), SEED_STEP_ARROWS)
def test_seed_step_arrows_exist(source: StepState, target: StepState) -> None:
    assert STEP_TRANSITIONS.can(source, target)
    STEP_TRANSITIONS.check(source, target)


@given(source=st.sampled_from(WorkflowState), target=st.sampled_from(WorkflowState))
def test_workflow_check_accepts_exactly_the_tables_arrows(
    source: WorkflowState, target: WorkflowState
) -> None:
    if target in WORKFLOW_TRANSITIONS.arrows[source]:
        WORKFLOW_TRANSITIONS.check(source, target)
        WORKFLOW_TRANSITIONS.check(source, target)
    else:
        with pytest.raises(IllegalTransitionError) as raised:
            WORKFLOW_TRANSITIONS.check(source, target)
        _assert_names_both_states(raised.value, "workflow", source, target)


@given(source=st.sampled_from(StepState), target=st.sampled_from(StepState))
def test_step_check_accepts_exactly_the_tables_arrows(source: StepState, target: StepState) -> None:
    if target in STEP_TRANSITIONS.arrows[source]:
        STEP_TRANSITIONS.check(source, target)
        STEP_TRANSITIONS.check(source, target)
    else:
        with pytest.raises(IllegalTransitionError) as raised:
            STEP_TRANSITIONS.check(source, target)
        _assert_names_both_states(raised.value, "step", source, target)


def _assert_names_both_states(
    error: IllegalTransitionError, kind: str, source: StrEnum, target: StrEnum
) -> None:
    message = str(error)
    assert f"a {kind} cannot go from {source.value} to {target.value}" in message
    assert (error.kind, error.source, error.target) == (kind, source.value, target.value)


@pytest.mark.parametrize(("table", "enum", "check"), MACHINES)
def test_every_state_has_a_row_and_targets_stay_in_the_machine(table, enum, check) -> None:
    assert set(table.arrows) == set(enum)
    for targets in table.arrows.values():
        assert all(isinstance(target, enum) for target in targets)


@pytest.mark.parametrize(("table", "enum", "check"), MACHINES)
def test_refusal_lists_the_allowed_targets(table, enum, check) -> None:
    for source in enum:
        allowed = table.allowed(source)
        refused = [target for target in enum if target not in allowed]
        for target in refused:
            with pytest.raises(IllegalTransitionError) as raised:
                check(source, target)
            message = str(raised.value)
            if allowed:
                listed = ", ".join(sorted(state.value for state in allowed))
                assert message.endswith(f"from {source.value} it may go to {listed}")
            else:
                assert message.endswith("nothing (it is final)")


@pytest.mark.parametrize(("table", "enum", "check"), MACHINES)
def test_can_agrees_with_allowed(table, enum, check) -> None:
    for source in enum:
        assert {target for target in enum if table.can(source, target)} == table.allowed(source)


def test_completed_and_compensated_are_final_for_workflows() -> None:
    finals = {state for state in WorkflowState if WORKFLOW_TRANSITIONS.is_final(state)}
    assert finals == {W.COMPLETED, W.COMPENSATED}
    for source in (W.COMPLETED, W.COMPENSATED):
        for target in WorkflowState:
            with pytest.raises(IllegalTransitionError, match=r"nothing \(it is final\)"):
                WORKFLOW_TRANSITIONS.check(source, target)


def test_skipped_and_compensated_are_final_for_steps() -> None:
    finals = {state for state in StepState if STEP_TRANSITIONS.is_final(state)}
    assert finals == {S.SKIPPED, S.COMPENSATED}


def test_every_workflow_state_is_reachable_from_pending() -> None:
    assert _reachable(WORKFLOW_TRANSITIONS, W.PENDING) == set(WorkflowState)


def test_every_step_state_is_reachable_from_pending() -> None:
    assert _reachable(STEP_TRANSITIONS, S.PENDING) == set(StepState)


def test_runnable_workflow_states_are_not_final() -> None:
    assert RUNNABLE_WORKFLOW_STATES == {W.PENDING, W.RUNNING, W.COMPENSATING}
    assert not any(WORKFLOW_TRANSITIONS.is_final(state) for state in RUNNABLE_WORKFLOW_STATES)


def test_an_unknown_source_has_no_arrows() -> None:
    table = TransitionTable[WorkflowState](kind="partial", arrows={W.PENDING: frozenset({W.RUNNING})})
    assert table.allowed(W.RUNNING) == frozenset()
    assert table.is_final(W.RUNNING)
    with pytest.raises(IllegalTransitionError, match="a partial cannot go from running to pending"):
        table.check(W.RUNNING, W.PENDING)


def test_states_compare_equal_to_their_labels() -> None:
    assert W("running") is W.RUNNING
    assert S.SKIPPED == "skipped"
    assert str(W.COMPENSATING) == "compensating"


@pytest.mark.parametrize(
    ("enum_name", "enum"), [("workflow_state", WorkflowState), ("step_state", StepState)]
)
def test_enum_labels_match_the_migration(enum_name: str, enum: type[StrEnum]) -> None:
    text = (sql_dir() / "migrations" / "0001_init.sql").read_text(encoding="utf-8")
    found = re.search(rf"CREATE TYPE {enum_name} AS ENUM \((.*?)\);", text, re.DOTALL)
    assert found is not None
    labels = re.findall(r"'([a-z_]+)'", found.group(1))
    assert labels == [state.value for state in enum]
